"""A tokenizer folder with ``tokenizer.json`` and no ``tokenizer.model`` (what transformers 5 saves) gives the ids
and text transformers gives for the same folder, under LLaVA's image rule; the converter refuses one it cannot
read before writing anything."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys

import pytest

import minillava
from minillava.chat import TEMPLATES, format_chat
from minillava.checkpoint import carried_files
from minillava.config import BUNDLED_MODEL
from minillava.tokenizer import Tokenizer
from minillava.tokenizer_json import JsonTokenizer
from tests.sp_fixtures import VOCAB_SIZE, write_tokenizer_dir
from tests.tiny_models import make_checkpoint
from weights_convert.__main__ import main as convert_main

K = 3
IMAGE_ID = VOCAB_SIZE
# transformers 4.x saved LLaMA tokenizers with a normalizer that prepends "▁" to every piece of text.
HUB_4X_NORMALIZER = {
    "type": "Sequence",
    "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
    ],
}


def save_with_transformers(src, dst):
    """What ``AutoTokenizer.from_pretrained(src).save_pretrained(dst)`` writes under transformers 5."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    assert not (dst / "tokenizer.model").exists()
    return dst


@pytest.fixture(
    scope="module", params=["v5 non-legacy", "v5 legacy", "hub 4.x non-legacy", "hub 4.x legacy missing", "bundled"]
)
def json_dir(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param.replace(" ", "-"))
    if request.param == "bundled":
        return save_with_transformers(BUNDLED_MODEL, root / "json")
    legacy = {"v5 non-legacy": False, "v5 legacy": True, "hub 4.x non-legacy": False}.get(request.param)
    sp_dir = write_tokenizer_dir(root / "sp", legacy=legacy)
    if request.param.startswith("v5"):
        return save_with_transformers(sp_dir, root / "json")
    # The hub's llava-hf layout: the sentencepiece folder's JSON files, and a 4.x tokenizer.json beside them.
    hub = root / "hub"
    shutil.copytree(sp_dir, hub)
    (hub / "tokenizer.model").unlink()
    data = json.loads((save_with_transformers(sp_dir, root / "json") / "tokenizer.json").read_text())
    data.update(normalizer=HUB_4X_NORMALIZER, pre_tokenizer=None)
    data["model"]["unk_token"] = "<unk>"
    (hub / "tokenizer.json").write_text(json.dumps(data))
    return hub


def texts(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = list("ab cd\n\t12日😀é▁:.") + ["</s>", "<s>", "<pad>", "<unk>", "<image>", "  ", "USER", " ASSISTANT:"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24))) for _ in range(n)]


def test_ids_and_text_equal_transformers(json_dir):
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(json_dir)
    ours = Tokenizer.from_dir(json_dir)
    assert isinstance(ours, JsonTokenizer)
    for text in texts():
        ids = theirs(text).input_ids
        assert ours.encode_text(text) == ids, repr(text)
        for skip in (True, False):
            want = theirs.decode(ids, skip_special_tokens=skip)
            assert ours.decode(ids, skip_special_tokens=skip) == want, (text, skip)
            stream = ours.incremental_decoder(skip_special_tokens=skip)
            assert "".join(stream.push(i) for i in ids) + stream.flush() == want


def test_image_prompts_follow_llava_chunk_rule(json_dir):
    """Each <image>-separated chunk is encoded by transformers' tokenizer on its own; one BOS at the start."""
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(json_dir)
    ours = Tokenizer.from_dir(json_dir)
    image_id = ours.token_to_id("<image>")
    conversation = [
        {"role": "user", "content": "<image>\nWhat is in the picture? 日本 café 12345"},
        {"role": "assistant", "content": "A cat — 3 of them.  Two  spaces."},
        {"role": "user", "content": "Compare <image> with this one."},
    ]
    for prompt in [format_chat(conversation, name) for name in TEMPLATES] + ["<image>", " <image> x", "a<image>"]:
        chunks = [theirs(chunk).input_ids for chunk in prompt.split("<image>")]
        want = chunks[0][:1] + chunks[0][1:]
        for chunk in chunks[1:]:
            want += [image_id] * K + chunk[1:]
        assert ours.encode(prompt, K, image_id) == want, prompt


def test_a_checkpoint_with_tokenizer_json_only_answers_as_with_sentencepiece(tmp_path, images):
    """The same tokenizer as tokenizer.model and as transformers 5's tokenizer.json: same prompts, same answers."""
    sp_model = make_checkpoint(tmp_path / "sp-model", seed=3)
    json_model = tmp_path / "json-model"
    shutil.copytree(sp_model, json_model)
    for path in carried_files(json_model):
        if path.name.startswith(("tokenizer", "special_tokens", "added_tokens")):
            path.unlink()
    for path in save_with_transformers(sp_model, tmp_path / "json-tok").iterdir():
        shutil.copy2(path, json_model / path.name)
    a, b = minillava.Pipeline(sp_model), minillava.Pipeline(json_model)
    assert isinstance(b.processor.tokenizer, JsonTokenizer)
    for prompt in ("What color is this?", "Describe the picture in detail."):
        assert b.chat(prompt, images=[images[0]], max_new_tokens=12) == a.chat(
            prompt, images=[images[0]], max_new_tokens=12
        )


def test_converter_takes_a_tokenizer_json_folder(tmp_path, hf_reference):
    """A llava-hf folder as transformers 5 saves it (tokenizer.json, no tokenizer.model) converts and loads."""
    _, _, converted = hf_reference(seed=2)
    src = tmp_path / "llava-hf"
    shutil.copytree(converted.parent / "hf", src)  # the transformers save the fixture converted
    save_with_transformers(write_tokenizer_dir(tmp_path / "sp", added_tokens=(), pad_token=None), tmp_path / "json")
    for path in (tmp_path / "json").iterdir():
        shutil.copy2(path, src / path.name)
    out = tmp_path / "out"
    assert convert_main([str(src), str(out)]) == 0
    assert (out / "tokenizer.json").is_file() and isinstance(Tokenizer.from_dir(out), JsonTokenizer)


def test_converter_refuses_an_unreadable_tokenizer_before_writing(tmp_path, hf_reference, capsys):
    _, _, converted = hf_reference(seed=2)
    src = tmp_path / "llava-hf"
    shutil.copytree(converted.parent / "hf", src)
    (src / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))
    assert convert_main([str(src), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "BertTokenizer" in err and "copy tokenizer.model" in err
    assert not (tmp_path / "out").exists()


def test_without_the_tokenizers_package_the_error_names_the_install(tmp_path):
    json_dir = save_with_transformers(write_tokenizer_dir(tmp_path / "sp"), tmp_path / "json")
    code = (
        "import sys; sys.modules['tokenizers'] = None\n"  # as if it were not installed
        "from minillava.tokenizer import Tokenizer\n"
        f"Tokenizer.from_dir({str(json_dir)!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert "MissingDependency" in result.stderr and "pip install 'minillava[tokenizers]'" in result.stderr
