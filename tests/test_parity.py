"""minillava against transformers' LlavaForConditionalGeneration, fp32 on CPU, part by part and whole."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from tests.hf_reference import IMAGE_TOKEN_ID, batch_inputs

FP32 = {"rtol": 1e-5, "atol": 1e-5}

OPTIONS = {
    "base-gqa": {},
    "mha": {"num_kv_heads": 4},
    "head_dim": {"head_dim": 24},
    "biases": {"attention_bias": True, "mlp_bias": True},
    "rope-linear": {"rope": {"rope_type": "linear", "factor": 2.0}},
    "rope-dynamic": {"rope": {"rope_type": "dynamic", "factor": 2.0}, "max_position_embeddings": 16},
    "rope-llama3": {
        "rope": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        }
    },
    "tied": {"tie_word_embeddings": True},
    "layer-list": {"vision_feature_layer": [-3, -1]},
    "full": {"strategy": "full"},
    "no-projector-bias": {"projector_bias": False},
}


def reset_dynamic_rope(hf) -> None:
    """transformers' dynamic RoPE keeps the longest length seen so far; start each comparison fresh,
    as minillava (stateless: frequencies for the longest position of the call) always does."""
    rotary = hf.model.language_model.rotary_emb
    if rotary.rope_type == "dynamic":
        rotary.max_seq_len_cached = rotary.original_max_seq_len
        rotary.inv_freq = rotary.original_inv_freq.clone()


@pytest.fixture(scope="module", params=list(OPTIONS), ids=list(OPTIONS))
def pair(request, hf_reference):
    hf, ours, _ = hf_reference(seed=len(request.param), **OPTIONS[request.param])
    return hf, ours


@pytest.fixture(autouse=True)
def fresh_reference(request):
    if "pair" in request.fixturenames:
        reset_dynamic_rope(request.getfixturevalue("pair")[0])


def test_vision_hidden_states(pair):
    hf, ours = pair
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        for layer in (0, 1, -2, -1):
            assert_close(ours.vision(pixels, [layer]), expected[layer], **FP32)


def test_image_rows(pair):
    hf, ours = pair
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
        expected = torch.stack(list(expected)) if isinstance(expected, (list, tuple)) else expected
        assert_close(ours.encode_images(pixels), expected.reshape(2, -1, expected.shape[-1]), **FP32)


def test_logits_with_images(pair):
    hf, ours = pair
    inputs = batch_inputs(ours.config.num_image_tokens, seed=3)
    with torch.no_grad():
        expected = hf(**inputs).logits
        got = ours(**inputs).logits
    assert got.shape == expected.shape
    assert expected.std() > 1.0, "reference logits too flat to catch bugs"
    assert_close(got, expected, **FP32)


def test_logits_text_only(pair):
    hf, ours = pair
    ids = torch.randint(3, IMAGE_TOKEN_ID, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert_close(ours(ids).logits, hf(input_ids=ids).logits, **FP32)


def test_loss_matches(pair):
    hf, ours = pair
    inputs = batch_inputs(ours.config.num_image_tokens, seed=5)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN_ID, -100)
    labels[:, :3] = -100
    with torch.no_grad():
        assert_close(ours(**inputs, labels=labels).loss, hf(**inputs, labels=labels).loss, **FP32)
