"""Hub ids (``org/name``) work wherever a checkpoint directory does: ``minillava.load``, ``load_processor``,
``Pipeline``, the command line and the converter read them from a hub cache laid out as the hub client lays it out,
offline (``HF_HUB_OFFLINE=1``, ``HF_HUB_CACHE`` pointing at a temporary folder). Nothing is downloaded."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minillava.checkpoint import carried_files
from minillava.hub import is_hub_id
from minillava.pipeline import Pipeline
from tests.sp_fixtures import write_tokenizer_dir

REVISION = "0123456789abcdef0123456789abcdef01234567"
QUESTION = "What is in the image?"


def put_in_hub_cache(cache: Path, repo_id: str, src: Path) -> Path:
    """``src``'s files as the hub client stores a download: content-addressed blobs, a snapshot of symlinks to
    them per revision, and ``refs/main`` naming the revision. Returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in sorted(p for p in src.iterdir() if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, chat_checkpoint, hf_reference):
    """A cache holding ``org/tiny-chat`` (a minillava checkpoint) and ``llava-hf/tiny-llava`` (an unconverted
    transformers save with its tokenizer)."""
    cache = tmp_path_factory.mktemp("hub")
    put_in_hub_cache(cache, "org/tiny-chat", chat_checkpoint)
    _, _, converted = hf_reference(seed=6)
    llava_hf = tmp_path_factory.mktemp("llava-hf") / "tiny-llava"
    shutil.copytree(converted.parent / "hf", llava_hf)
    for path in carried_files(write_tokenizer_dir(tmp_path_factory.mktemp("tok"), added_tokens=(), pad_token=None)):
        shutil.copy2(path, llava_hf / path.name)
    put_in_hub_cache(cache, "llava-hf/tiny-llava", llava_hf)
    return cache


def run_offline(cache: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=300)


def test_python_api_reads_hub_ids(hub_cache, chat_checkpoint, images):
    code = f"""
import json, minillava
model = minillava.load("org/tiny-chat")
processor = minillava.load_processor("org/tiny-chat")
pipe = minillava.Pipeline("org/tiny-chat")
print(json.dumps({{"answer": pipe.chat({QUESTION!r}, images=[{str(images[0])!r}], max_new_tokens=10),
                   "path": str(pipe.path), "image_token_id": processor.image_token_id,
                   "vocab": model.config.text.vocab_size}}))
"""
    result = run_offline(hub_cache, "-c", code)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout.splitlines()[-1])
    local = Pipeline(chat_checkpoint)
    assert got["answer"] == local.chat(QUESTION, images=[str(images[0])], max_new_tokens=10)
    assert Path(got["path"]) == hub_cache / "models--org--tiny-chat" / "snapshots" / REVISION
    assert got["image_token_id"] == local.processor.image_token_id
    assert got["vocab"] == local.model.config.text.vocab_size


def test_command_line_reads_hub_ids(hub_cache, chat_checkpoint, images):
    argv = ["generate", "--image", str(images[0]), "--prompt", QUESTION, "--max-new-tokens", "10"]
    result = run_offline(hub_cache, "-m", "minillava", *argv, "--model", "org/tiny-chat")
    assert result.returncode == 0, result.stderr
    assert result.stdout == Pipeline(chat_checkpoint).chat(QUESTION, images=[str(images[0])], max_new_tokens=10) + "\n"
    result = run_offline(hub_cache, "-m", "minillava", "info", "--model", "llava-hf/tiny-llava", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["layout"] == "llava-hf"


def test_converter_reads_hub_ids(hub_cache, tmp_path):
    out = tmp_path / "converted"
    result = run_offline(hub_cache, "-m", "minillava", "convert", "llava-hf/tiny-llava", str(out))
    assert result.returncode == 0, result.stderr
    assert "from llava-hf" in result.stdout
    assert (out / "tokenizer.model").is_file() and json.loads((out / "config.json").read_text())["format"]


def test_a_hub_id_missing_from_the_cache_offline_is_one_clear_error(hub_cache):
    result = run_offline(hub_cache, "-m", "minillava", "info", "--model", "org/not-downloaded")
    assert result.returncode == 1
    err = result.stderr.strip()
    assert "\n" not in err and err.startswith("minillava info: error: org/not-downloaded")
    assert "not in the Hugging Face cache" in err and str(hub_cache) in err and "HF_HUB_OFFLINE" in err


def test_without_huggingface_hub_the_error_names_the_install(hub_cache):
    code = "import sys; sys.modules['huggingface_hub'] = None; import minillava; minillava.load('org/tiny-chat')"
    result = run_offline(hub_cache, "-c", code)
    assert result.returncode != 0
    assert "org/tiny-chat is not a local directory" in result.stderr
    assert "pip install 'minillava[hub]'" in result.stderr


def test_what_counts_as_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local" / "model").mkdir(parents=True)
    assert is_hub_id("llava-hf/llava-1.5-7b-hf") and is_hub_id("liuhaotian/llava-v1.5-7b")
    assert not is_hub_id("local/model")  # an existing directory wins
    for path in ("/abs/model", "./rel/model", "a/b/c", "a/../b", "model", "org/", "/org/name"):
        assert not is_hub_id(path), path
