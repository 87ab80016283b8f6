"""Every way a conversion can fail: non-zero exit, one readable line naming the file/tensor and the fix, no
traceback unless --verbose, nothing left at DST, and no code from a checkpoint ever runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.hf_reference import convert_hf, make_hf_model, make_original_model, save_clip_dir, save_hf, save_original
from weights_convert.__main__ import main as convert_main

SHARD1 = "pytorch_model-00001-of-00002.bin"


class WritesAFile:
    """A pickle payload: unpickling it calls ``open(path, "w")``, creating the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.fixture(scope="module")
def tiny():
    return make_original_model(seed=6)


@pytest.fixture
def original(tmp_path, tiny):
    src = save_original(tiny, tmp_path / "llava-v1.5-7b")
    clip = save_clip_dir(tiny, tmp_path / "clip")
    return src, clip


def run(args, capsys) -> str:
    """Run the CLI, expect failure, and return its single stderr line."""
    capsys.readouterr()  # drop what building the fixtures printed
    assert convert_main([str(a) for a in args]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_unknown_layout_lists_supported_and_found(tmp_path, capsys):
    src = tmp_path / "blip"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "blip-2"}))
    (src / "model.safetensors").write_bytes(b"")
    line = run([src, tmp_path / "out"], capsys)
    assert "unknown checkpoint layout" in line and "model_type='blip-2'" in line and "model.safetensors" in line
    assert "llava-hf (" in line and "original LLaVA (" in line
    assert not (tmp_path / "out").exists()


def test_no_config(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "no config.json" in run([tmp_path / "empty", tmp_path / "out"], capsys)


def edit_shard(src: Path, edit) -> None:
    path = src / SHARD1
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def test_missing_tensor_is_named(original, tmp_path, capsys):
    src, clip = original
    edit_shard(src, lambda s: s.pop("model.embed_tokens.weight"))
    line = run([src, tmp_path / "out", "--vision-tower", clip], capsys)
    assert "missing tensors: llm.embed_tokens.weight" in line
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_unexpected_tensor_is_named(original, tmp_path, capsys):
    src, clip = original
    edit_shard(src, lambda s: s.update({"model.mm_projector.4.weight": torch.zeros(2, 2)}))
    line = run([src, tmp_path / "out", "--vision-tower", clip], capsys)
    assert f"unexpected tensors: model.mm_projector.4.weight (in {SHARD1})" in line


def test_unmapped_tensor_is_named(original, tmp_path, capsys):
    src, clip = original
    edit_shard(src, lambda s: s.update({"extra_head.weight": torch.zeros(2)}))
    line = run([src, tmp_path / "out", "--vision-tower", clip], capsys)
    assert f"unexpected tensors: extra_head.weight (in {SHARD1})" in line


def test_misshaped_tensor_is_named(original, tmp_path, capsys):
    src, clip = original
    edit_shard(src, lambda s: s.update({"model.embed_tokens.weight": torch.ones(96, 63, dtype=torch.float16)}))
    line = run([src, tmp_path / "out", "--vision-tower", clip], capsys)
    assert f"model.embed_tokens.weight (in {SHARD1}) is [96, 63], expected [96, 64]" in line
    assert "missing" not in line


def test_missing_shard_is_named(original, tmp_path, capsys):
    src, clip = original
    (src / "pytorch_model-00002-of-00002.bin").unlink()
    line = run([src, tmp_path / "out", "--vision-tower", clip], capsys)
    assert "pytorch_model-00002-of-00002.bin" in line and "missing" in line


def test_truncated_bin_shard_is_named(original, tmp_path, capsys):
    src, clip = original
    data = (src / SHARD1).read_bytes()
    (src / SHARD1).write_bytes(data[: len(data) // 2])
    line = run([src, tmp_path / "out", "--vision-tower", clip], capsys)
    assert SHARD1 in line and "truncated" in line


def test_truncated_safetensors_shard_is_named(tmp_path, capsys):
    src = save_hf(make_hf_model(seed=1), tmp_path / "hf", max_shard_size="100KB")
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    line = run([src, tmp_path / "out"], capsys)
    assert shard.name in line and "truncated" in line


def test_clip_width_must_match_mm_hidden_size(tmp_path, capsys):
    model = make_original_model(seed=1)
    src = save_original(model, tmp_path / "llava", mm_hidden_size=48)
    clip = save_clip_dir(model, tmp_path / "clip")
    line = run([src, tmp_path / "out", "--vision-tower", clip], capsys)
    assert "CLIP width 32 does not match mm_hidden_size 48" in line


def test_vision_tower_must_be_clip(original, tmp_path, capsys):
    src, clip = original
    (clip / "config.json").write_text(json.dumps({"model_type": "siglip_vision_model"}))
    assert "not a CLIP checkpoint (model_type='siglip_vision_model')" in run(
        [src, tmp_path / "out", "--vision-tower", clip], capsys
    )


def test_no_tower_anywhere_names_the_fix(original, tmp_path, capsys):
    src, _ = original
    line = run([src, tmp_path / "out"], capsys)
    assert "no vision tower weights" in line and "--vision-tower" in line and "clip-vit-large-patch14-336" in line


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"mm_use_im_start_end": True}, "mm_use_im_start_end"),
        ({"image_aspect_ratio": "anyres_max_9"}, "anyres_max_9"),
        ({"image_aspect_ratio": "anyres"}, "image_grid_pinpoints None"),
        ({"mm_patch_merge_type": "spatial"}, "'spatial'"),
        ({"mm_patch_merge_type": "spatial_unpad"}, "spatial_unpad"),
        ({"mm_projector_type": "qformer"}, "qformer"),
        ({"mm_vision_select_feature": "cls"}, "'cls'"),
    ],
)
def test_unsupported_original_features_are_refused(tmp_path, tiny, capsys, override, needle):
    src = save_original(tiny, tmp_path / "llava", **override)
    clip = save_clip_dir(tiny, tmp_path / "clip")
    line = run([src, tmp_path / "out", "--vision-tower", clip], capsys)
    assert needle in line and "config.json" in line


def test_pickle_that_runs_code_is_refused(original, tmp_path, capsys):
    src, clip = original
    marker = tmp_path / "pwned"
    state = torch.load(src / SHARD1, weights_only=True)
    state["model.norm.weight"] = WritesAFile(marker)
    torch.save(state, src / SHARD1)
    line = run([src, tmp_path / "out", "--vision-tower", clip], capsys)
    assert SHARD1 in line and "refused" in line and "io.open" in line
    assert not marker.exists()
    import minillava

    with pytest.raises(ValueError, match="refused"):
        minillava.load(src, vision_tower=clip)
    assert not marker.exists()
    # The payload is live: an unsafe load would have created the file.
    torch.load(src / SHARD1, weights_only=False)
    assert marker.exists()


def test_non_empty_dst_needs_force_and_force_replaces_only_when_done(original, tmp_path, capsys):
    src, clip = original
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    assert "--force" in run([src, dst, "--vision-tower", clip], capsys)
    # A failing conversion with --force leaves the old directory as it was.
    assert "no vision tower" in run([src, dst, "--force"], capsys)
    assert (dst / "keep.txt").read_text() == "old"
    assert leftovers(tmp_path) == []
    assert convert_main([str(src), str(dst), "--vision-tower", str(clip), "--force"]) == 0
    assert not (dst / "keep.txt").exists() and (dst / "config.json").is_file()
    assert leftovers(tmp_path) == []


def test_failure_while_writing_leaves_nothing(original, tmp_path, monkeypatch, capsys):
    src, clip = original
    from minillava import safetensors_io

    real = safetensors_io.ShardWriter.write
    calls = []

    def failing(self, name, tensor):
        calls.append(name)
        if len(calls) == 5:
            raise OSError("No space left on device")
        real(self, name, tensor)

    monkeypatch.setattr(safetensors_io.ShardWriter, "write", failing)
    assert "No space left" in run([src, tmp_path / "out", "--vision-tower", clip], capsys)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_verbose_shows_the_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        convert_main([str(tmp_path / "empty"), str(tmp_path / "out"), "--verbose"])


def test_option_errors(original, tmp_path, capsys):
    src, clip = original
    assert "--max-shard-size" in run([src, tmp_path / "o", "--vision-tower", clip, "--max-shard-size", "lots"], capsys)
    hf_dir = save_hf(make_hf_model(seed=2), tmp_path / "hf")
    assert "drop --vision-tower" in run([hf_dir, tmp_path / "o", "--vision-tower", clip], capsys)
    assert "--pad-vocab only" in run([hf_dir, tmp_path / "o", "--pad-vocab"], capsys)


def test_export_refuses_a_damaged_minillava_checkpoint(tmp_path, capsys):
    _, converted = convert_hf(make_hf_model(seed=3), tmp_path)
    weights = load_file(converted / "model.safetensors")
    weights.pop("projector.layers.1.bias")
    save_file(weights, converted / "model.safetensors")
    line = run(["--to", "hf", converted, tmp_path / "out"], capsys)
    assert "missing tensors: projector.layers.1.bias" in line


def test_cli_process_exit_code_and_single_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "weights_convert", str(tmp_path / "empty"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "no config.json" in result.stderr
