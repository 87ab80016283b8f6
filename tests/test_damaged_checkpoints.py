"""Damaged or hostile checkpoints are refused where they are read, naming the file, tensor or field, never
converted into silently wrong weights and never left to fail later with a raw torch or safetensors error."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import minillava
from minillava import cli
from minillava.checkpoint import describe_checkpoint
from minillava.train import train
from tests.hf_reference import make_hf_model, save_hf
from tests.tiny_models import train_config
from weights_convert.__main__ import main as convert_main

UP = "llm.layers.0.mlp.up_proj.weight"
GATE = "llm.layers.0.mlp.gate_proj.weight"


@pytest.fixture
def ckpt(chat_checkpoint, tmp_path) -> Path:
    """A copy of a tiny minillava checkpoint to damage."""
    return Path(shutil.copytree(chat_checkpoint, tmp_path / "ckpt"))


def read_raw(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_raw(path: Path, header: dict, body: bytes) -> None:
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + body)


def convert_error(src: Path, dst: Path, capsys, *flags: str) -> str:
    capsys.readouterr()
    assert convert_main([str(src), str(dst), *flags]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert not dst.exists()
    return err


def edit_config(directory: Path, edit) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


# --- safetensors files ---


def test_overlapping_tensors_are_refused_not_laundered(ckpt, tmp_path, capsys):
    weights = ckpt / "model.safetensors"
    header, body = read_raw(weights)
    header[UP]["data_offsets"] = header[GATE]["data_offsets"]  # up_proj would read gate_proj's bytes
    write_raw(weights, header, body)
    err = convert_error(ckpt, tmp_path / "out", capsys)
    assert str(weights) in err and "damaged" in err and UP in err
    with pytest.raises(OSError, match=rf"{weights}.*{UP}.*damaged"):
        minillava.load(ckpt)


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda h, b: (h, b[:-100]), "truncated"),
        (lambda h, b: (h, b + bytes(16)), "16 bytes after the last tensor"),
        (lambda h, b: ({**h, UP: {**h[UP], "data_offsets": [8, 4]}}, b), f"{UP} has data offsets [8, 4]"),
        (lambda h, b: ({**h, UP: {**h[UP], "shape": [-1, 64]}}, b), f"{UP} has shape [-1, 64]"),
    ],
    ids=["truncated", "trailing bytes", "reversed offsets", "negative shape"],
)
def test_a_damaged_safetensors_file_is_named_by_every_reader(ckpt, tmp_path, capsys, damage, needle):
    weights = ckpt / "model.safetensors"
    write_raw(weights, *damage(*read_raw(weights)))
    err = convert_error(ckpt, tmp_path / "out", capsys)
    assert str(weights) in err and needle in err, err
    for read in (minillava.load, describe_checkpoint):
        with pytest.raises(OSError) as err:
            read(ckpt)
        assert str(weights) in str(err.value) and needle in str(err.value), str(err.value)


def test_a_damaged_optimizer_file_is_named_on_resume(train_setup, tmp_path):
    train(train_config(train_setup, tmp_path / "out", max_steps=1, save_every=1))
    optimizer = tmp_path / "out" / "checkpoint-1" / "optimizer.safetensors"
    optimizer.write_bytes(optimizer.read_bytes()[:-8])
    with pytest.raises(OSError, match=rf"{optimizer}: .*truncated"):
        train(train_config(train_setup, tmp_path / "out", max_steps=2, resume="latest"))


# --- tensor values and dtypes ---


def test_non_finite_weights_are_refused_unless_allowed(ckpt, tmp_path, capsys):
    weights = load_file(ckpt / "model.safetensors")
    weights[UP][3, 5] = float("nan")
    weights[GATE][0, 0] = 1e6  # finite in float32, infinite once cast to float16
    save_file(weights, ckpt / "model.safetensors")
    err = convert_error(ckpt, tmp_path / "out", capsys)
    assert UP in err and "1 NaN" in err and "--allow-nonfinite" in err
    weights[UP][3, 5] = 0.0
    save_file(weights, ckpt / "model.safetensors")
    assert convert_main([str(ckpt), str(tmp_path / "fp32")]) == 0
    assert GATE in convert_error(ckpt, tmp_path / "out", capsys, "--dtype", "float16")
    assert convert_main([str(ckpt), str(tmp_path / "fp16"), "--dtype", "float16", "--allow-nonfinite"]) == 0
    assert torch.isinf(load_file(tmp_path / "fp16" / "model.safetensors")[GATE][0, 0])


def test_integer_weights_are_refused_naming_the_tensor(ckpt, tmp_path, capsys):
    weights = load_file(ckpt / "model.safetensors")
    weights[UP] = weights[UP].to(torch.int64)
    save_file(weights, ckpt / "model.safetensors")
    err = convert_error(ckpt, tmp_path / "out", capsys)
    assert f"{UP} (in model.safetensors) is int64, expected a floating dtype" in err
    with pytest.raises(ValueError, match=rf"{UP} \(in model.safetensors\) is int64"):
        minillava.load(ckpt)


# --- config.json ---


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["text"].update(rms_norm_eps="1e-5"), "text.rms_norm_eps must be a number > 0, got '1e-5'"),
        (lambda c: c["text"].update(hidden_size="64"), "text.hidden_size must be an integer >= 1, got '64'"),
        (lambda c: c["text"].update(num_layers=-1), "text.num_layers must be an integer >= 1, got -1"),
        (lambda c: c["text"].update(tie_word_embeddings="no"), "text.tie_word_embeddings must be true or false"),
        (lambda c: c["vision"].update(patch_size=0), "vision.patch_size must be an integer >= 1, got 0"),
        (lambda c: c["vision"].update(image_size=5), "vision.image_size 5 is smaller than its patch_size 7"),
        (lambda c: c.update(text=[]), "text must be a JSON object"),
        (lambda c: c["image"].update(std=[0.2, 0.0, 0.2]), "image.std must be 3 numbers > 0"),
        (lambda c: c.update(image_token_id=-200), "image_token_id must be an integer >= 0, got -200"),
    ],
)
def test_a_bad_config_is_refused_when_read_naming_the_field(ckpt, tmp_path, capsys, edit, message):
    edit_config(ckpt, edit)
    config = ckpt / "config.json"
    for error in (convert_error(ckpt, tmp_path / "out", capsys), load_error(ckpt)):
        assert str(config) in error and message in error, error


def load_error(path: Path) -> str:
    with pytest.raises(ValueError) as err:
        minillava.load(path)
    return str(err.value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(text_config=[]), "text_config must be a JSON object, got list"),
        (lambda c: c["vision_config"].update(patch_size=0), "vision.patch_size must be an integer >= 1, got 0"),
        (lambda c: c["text_config"].update(rms_norm_eps="1e-6"), "text.rms_norm_eps must be a number > 0"),
    ],
)
def test_a_bad_llava_hf_config_is_refused_naming_the_file(tmp_path, capsys, edit, message):
    src = save_hf(make_hf_model(seed=4), tmp_path / "hf")
    edit_config(src, edit)
    err = convert_error(src, tmp_path / "out", capsys)
    assert str(src / "config.json") in err and message in err, err


# --- load() arguments ---


def test_load_takes_dtype_names_and_refuses_non_floating_dtypes(chat_checkpoint):
    model = minillava.load(chat_checkpoint, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for bad, shown in [(torch.int8, "torch.int8"), (torch.float8_e4m3fn, "torch.float8_e4m3fn"), ("fp8", "'fp8'")]:
        with pytest.raises(ValueError, match=rf"dtype {shown}.* float32, bfloat16 or float16"):
            minillava.load(chat_checkpoint, dtype=bad)


# --- the shard index ---


@pytest.mark.parametrize(
    ("index", "message"),
    [
        ('{"weight_map": ', "not valid JSON"),
        ('{"metadata": {}}', "no 'weight_map'"),
        ('{"weight_map": {"a": 3}}', "tensor 'a' maps to 3, not a file name"),
        ('{"weight_map": {"a": "../../etc/passwd"}}', "not a file name"),
        ('{"weight_map": ["model-00001-of-00004.safetensors"]}', "no 'weight_map'"),
    ],
)
def test_a_damaged_shard_index_is_named(chat_checkpoint, tmp_path, capsys, index, message):
    sharded = tmp_path / "sharded"
    assert convert_main([str(chat_checkpoint), str(sharded), "--max-shard-size", "300KB"]) == 0
    path = sharded / "model.safetensors.index.json"
    path.write_text(index)
    for read in (minillava.load, describe_checkpoint):
        with pytest.raises(ValueError) as err:
            read(sharded)
        assert str(path) in str(err.value) and message in str(err.value), str(err.value)
    capsys.readouterr()
    assert cli.main(["info", "--model", str(sharded)]) == 1
    assert message in capsys.readouterr().err
