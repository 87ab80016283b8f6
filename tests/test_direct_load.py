"""``minillava.load`` on unconverted directories: llava-hf and original LLaVA are mapped on the fly with the
converter's tables and give exactly the tensors (and config) a conversion would, without writing anything."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import minillava
from minillava.checkpoint import load_config
from tests.hf_reference import (
    IMAGE_TOKEN_ID,
    ORIGINAL_PLACEHOLDER,
    expand_sentinels,
    make_hf_model,
    make_original_model,
    save_clip_dir,
    save_hf,
    save_original,
    sentinel_batch,
)
from weights_convert.__main__ import main as convert_main

FP32 = {"rtol": 1e-5, "atol": 1e-5}


def listing(directory):
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir())


def assert_same_model(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert a.config == b.config


@pytest.mark.parametrize("layout", ["v4", "v5"])
def test_llava_hf_direct_equals_converted(tmp_path, layout):
    src = save_hf(make_hf_model(seed=2), tmp_path / "hf", layout=layout, max_shard_size="100KB")
    assert convert_main([str(src), str(tmp_path / "conv")]) == 0
    before = listing(src)
    direct = minillava.load(src)
    assert listing(src) == before  # nothing written next to the source
    assert_same_model(direct, minillava.load(tmp_path / "conv"))
    assert load_config(src) == direct.config


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("original")
    hf = make_original_model(seed=8)
    src = save_original(hf, tmp_path / "llava-v1.5-13b")
    clip = save_clip_dir(hf, tmp_path / "clip")
    return hf, src, clip, tmp_path


def test_original_direct_equals_converted_and_transformers(original):
    hf, src, clip, tmp_path = original
    dst = tmp_path / "conv"
    assert convert_main([str(src), str(dst), "--vision-tower", str(clip)]) == 0
    before = listing(src)
    direct = minillava.load(src, vision_tower=clip)
    assert listing(src) == before
    assert_same_model(direct, minillava.load(dst))
    assert load_config(src, vision_tower=clip) == direct.config
    model = minillava.load(src, dtype=torch.float32, vision_tower=clip)
    k = model.config.num_image_tokens
    batch = sentinel_batch(seed=21)
    with torch.no_grad():
        expected = hf(
            input_ids=expand_sentinels(batch["input_ids"], k, IMAGE_TOKEN_ID), pixel_values=batch["pixel_values"]
        )
        got = model(expand_sentinels(batch["input_ids"], k, ORIGINAL_PLACEHOLDER), batch["pixel_values"])
    assert_close(got.logits, expected.logits, **FP32)


def test_original_with_tower_inside_needs_no_vision_tower(tmp_path):
    hf = make_original_model(seed=5, vision={"hidden_size": 64, "num_attention_heads": 1})
    src = save_original(hf, tmp_path / "llava", tower_inside=True)
    model = minillava.load(src, dtype=torch.float32)
    assert torch.equal(model.vision.embeddings.class_embedding, hf.model.vision_tower.embeddings.class_embedding)


def test_dtype_and_errors(original):
    _, src, clip, tmp_path = original
    model = minillava.load(src, dtype=torch.bfloat16, vision_tower=clip)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="vision_tower="):
        minillava.load(src)
    hf_dir = save_hf(make_hf_model(seed=3), tmp_path / "hf")
    with pytest.raises(ValueError, match="drop --vision-tower"):
        minillava.load(hf_dir, vision_tower=clip)
    assert convert_main([str(hf_dir), str(tmp_path / "mini")]) == 0
    with pytest.raises(ValueError, match="drop vision_tower"):
        minillava.load(tmp_path / "mini", vision_tower=clip)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        minillava.load(tmp_path / "nothing")
