"""Original LLaVA checkpoints (fp16 .bin shards + a separate CLIP directory) converted, then compared with
transformers on the same inputs, fp32 on CPU. The original's -200 sentinel becomes K placeholders on both sides."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

import minillava
from minillava.checkpoint import load_config
from tests.hf_reference import (
    IMAGE_TOKEN_ID,
    ORIGINAL_PLACEHOLDER,
    expand_sentinels,
    make_original_model,
    save_clip_dir,
    save_original,
    sentinel_batch,
)
from weights_convert.__main__ import main as convert_main

FP32 = {"rtol": 1e-5, "atol": 1e-5}

# name: (model options, layout options)
VARIANTS = {
    "mlp2x_gelu-patch": ({}, {}),
    "linear-patch": ({"projector": "linear"}, {"projector": "linear"}),
    "mlp2x_gelu-cls_patch": ({"strategy": "full"}, {}),
    "safetensors+clip-vision-5x": ({}, {"fmt": "safetensors", "clip_full": False}),
    # A 64-wide tower: its head count is read off the shapes (OpenAI CLIP's 64-wide heads), no CLIP config given.
    "tower-inside": ({"vision": {"hidden_size": 64, "num_attention_heads": 1}}, {"tower_inside": True, "clip": False}),
    # Tower in the weights and a CLIP directory with other weights: the config comes from it, the weights do not.
    "tower-inside+clip-dir": ({}, {"tower_inside": True, "clip_seed": 7}),
}


def build(tmp_path, model_options, layout):
    hf = make_original_model(seed=3, **model_options)
    src = save_original(
        hf,
        tmp_path / "llava-v1.5-7b",
        projector=layout.get("projector", "mlp2x_gelu"),
        tower_inside=layout.get("tower_inside", False),
        fmt=layout.get("fmt", "bin"),
    )
    args = []
    if layout.get("clip", True):
        clip_model = hf
        if "clip_seed" in layout:  # a different tower, to show the LLaVA weights win
            clip_model = make_original_model(seed=layout["clip_seed"], **model_options)
        clip = save_clip_dir(clip_model, tmp_path / "clip", full=layout.get("clip_full", True))
        args = ["--vision-tower", str(clip)]
    return hf, src, args


@pytest.fixture(scope="module", params=list(VARIANTS), ids=list(VARIANTS))
def converted(request, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp(request.param)
    hf, src, args = build(tmp_path, *VARIANTS[request.param])
    dst = tmp_path / "converted"
    assert convert_main([str(src), str(dst), *args]) == 0
    return hf, minillava.load(dst, dtype=torch.float32), dst


def test_logits_match_transformers(converted):
    hf, ours, _ = converted
    k = ours.config.num_image_tokens
    batch = sentinel_batch(seed=11)
    with torch.no_grad():
        expected = hf(
            input_ids=expand_sentinels(batch["input_ids"], k, IMAGE_TOKEN_ID), pixel_values=batch["pixel_values"]
        )
        got = ours(expand_sentinels(batch["input_ids"], k, ORIGINAL_PLACEHOLDER), batch["pixel_values"])
    assert expected.logits.std() > 1.0, "reference logits too flat to catch bugs"
    assert_close(got.logits, expected.logits, **FP32)


def test_text_only_logits(converted):
    hf, ours, _ = converted
    ids = torch.randint(3, IMAGE_TOKEN_ID, (2, 30), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        assert_close(ours(ids).logits, hf(input_ids=ids).logits, **FP32)


def test_weights_are_the_fp16_checkpoint(converted):
    """Stored as fp16, as released (the source dtype is kept; the fp32 CLIP tower takes the LLaVA weights' dtype,
    as original LLaVA casts it), and equal to the reference's values."""
    hf, _, dst = converted
    stored = minillava.load(dst)
    assert {p.dtype for p in stored.parameters()} == {torch.float16}
    assert torch.equal(stored.llm.embed_tokens.weight.float(), hf.model.language_model.embed_tokens.weight)
    assert torch.equal(stored.llm.lm_head.weight.float(), hf.lm_head.weight)


def test_config_and_carried_files(converted):
    hf, ours, dst = converted
    config = ours.config
    assert config.image_token_id == config.text.vocab_size == ORIGINAL_PLACEHOLDER
    assert config.source_layout == "original"
    assert config.image.mode == "pad"
    assert config.image.crop_size == config.image.shortest_edge == 28
    assert config.chat_template == "llava_v1"
    assert config.generation == {"bos_token_id": 1, "eos_token_id": 2}
    assert config.text.rms_norm_eps == hf.config.text_config.rms_norm_eps
    assert config.vision_feature_layer == -2
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (dst / name).is_file(), name
    saved = json.loads((dst / "config.json").read_text())
    assert saved["format"] == "minillava" and saved["image_token_id"] == ORIGINAL_PLACEHOLDER


def test_dtype_option_and_small_shards(tmp_path):
    hf, src, args = build(tmp_path, {}, {})
    dst = tmp_path / "bf16"
    assert convert_main([str(src), str(dst), *args, "--dtype", "bfloat16", "--max-shard-size", "20KB"]) == 0
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    model = minillava.load(dst)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.llm.norm.weight, hf.model.language_model.norm.weight.bfloat16())


@pytest.mark.parametrize(
    ("name", "template"),
    [
        ("llava-v1.5-13b", "llava_v1"),
        ("llava-llama-2-13b-chat-lightning-preview", "llava_llama_2"),
        ("llava-v1.6-mistral-7b", "mistral_instruct"),
        ("my-finetune", "llava_v1"),
        ("models--liuhaotian--llava-llama-2-7b/snapshots/" + "ab" * 20, "llava_llama_2"),
        ("llava-llama-2-run/checkpoint-500", "llava_llama_2"),
    ],
)
def test_chat_template_from_directory_name(tmp_path, name, template):
    """Original LLaVA's CLI picks the template from the model name; a hub-cache snapshot stands for its repo."""
    hf = make_original_model(seed=1)
    src = save_original(hf, tmp_path / name)
    clip = save_clip_dir(hf, tmp_path / "clip")
    assert load_config(src, vision_tower=clip).chat_template == template
