"""minillava.load refuses bad checkpoints with errors that name the path and the keys."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import minillava


@pytest.fixture(scope="module")
def converted(hf_reference):
    return hf_reference(seed=5)[2]


def edited_copy(converted, tmp_path, edit):
    dst = tmp_path / "edited"
    shutil.copytree(converted, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        minillava.load(tmp_path)


def test_missing_tensor_is_named(converted, tmp_path):
    path = edited_copy(converted, tmp_path, lambda t: t.pop("llm.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: llm\.layers\.1\.mlp\.up_proj\.weight") as err:
        minillava.load(path)
    assert str(path) in str(err.value)


def test_unexpected_tensor_is_named(converted, tmp_path):
    path = edited_copy(converted, tmp_path, lambda t: t.update({"llm.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensors: llm\.extra\.weight"):
        minillava.load(path)


def test_wrong_shape_is_named(converted, tmp_path):
    path = edited_copy(converted, tmp_path, lambda t: t.update({"llm.norm.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"llm\.norm\.weight .*is \[3\], expected \[64\]"):
        minillava.load(path)


def test_not_a_minillava_config(converted, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="config.json"):
        minillava.load(tmp_path)
