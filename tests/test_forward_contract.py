"""The forward contract against transformers: hidden states, attention maps, image features, inputs_embeds."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from minillava.generate import generate
from tests.hf_reference import IMAGE_TOKEN_ID, batch_inputs

FP32 = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def pair(hf_reference):
    hf, ours, _ = hf_reference(seed=31)
    # The attention probabilities come from transformers' eager path; the tower stays on SDPA, as ours.
    hf.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa"})
    return hf, ours


@pytest.fixture(scope="module")
def inputs(pair):
    return batch_inputs(pair[1].config.num_image_tokens, seed=2)


@pytest.fixture(scope="module")
def outputs(pair, inputs):
    hf, ours = pair
    with torch.no_grad():
        theirs = hf(**inputs, output_hidden_states=True, output_attentions=True)
        mine = ours(**inputs, output_hidden_states=True, output_attentions=True)
    return theirs, mine


def test_hidden_states_follow_transformers(pair, outputs):
    theirs, mine = outputs
    layers = pair[1].config.text.num_layers
    assert len(mine.hidden_states) == len(theirs.hidden_states) == layers + 1
    for i, (a, b) in enumerate(zip(mine.hidden_states, theirs.hidden_states, strict=True)):
        assert_close(a, b, **FP32, msg=lambda m, i=i: f"hidden_states[{i}]: {m}")


def test_last_hidden_state_is_after_the_final_norm(pair, outputs):
    _, mine = outputs
    assert_close(pair[1].llm.logits(mine.hidden_states[-1]), mine.logits, rtol=0, atol=0)


def test_attentions_equal_transformers_eager(pair, outputs):
    theirs, mine = outputs
    config = pair[1].config.text
    assert len(mine.attentions) == config.num_layers
    for i, (a, b) in enumerate(zip(mine.attentions, theirs.attentions, strict=True)):
        assert a.shape == (2, config.num_heads, 44, 44)
        assert_close(a, b, **FP32, msg=lambda m, i=i: f"attentions[{i}]: {m}")
        assert_close(a.sum(-1), torch.ones(a.shape[:-1]), **FP32)


def test_attention_outputs_do_not_change_the_logits(pair, inputs, outputs):
    _, mine = outputs
    with torch.no_grad():
        plain = pair[1](**inputs)
    assert plain.attentions is None and plain.hidden_states is None
    assert_close(mine.logits, plain.logits, **FP32)


def hf_image_features(hf, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack(hf.get_image_features(pixel_values=pixel_values).pooler_output)


def test_image_features_equal_transformers(pair, inputs, outputs):
    hf, ours = pair
    _, mine = outputs
    k, d = ours.config.num_image_tokens, ours.config.text.hidden_size
    assert mine.image_features.shape == (3, k, d)
    assert_close(mine.image_features, hf_image_features(hf, inputs["pixel_values"]), **FP32)


@torch.no_grad()
def test_inputs_embeds_path_equals_input_ids_path(pair, inputs):
    _, ours = pair
    embeds = ours.embed(inputs["input_ids"], inputs["pixel_values"])
    assert_close(ours(inputs_embeds=embeds).logits, ours(**inputs).logits, rtol=0, atol=0)
    hf, _ = pair
    with torch.no_grad():
        theirs = hf.get_input_embeddings()(inputs["input_ids"])
    is_image = (inputs["input_ids"] == IMAGE_TOKEN_ID)[..., None]
    rows = hf_image_features(hf, inputs["pixel_values"]).reshape(-1, embeds.shape[-1])
    assert_close(embeds, theirs.masked_scatter(is_image, rows), **FP32)


@pytest.mark.parametrize("given", ["both", "neither"])
def test_exactly_one_of_ids_and_embeds(pair, inputs, given):
    _, ours = pair
    args = {} if given == "neither" else {"input_ids": inputs["input_ids"], "inputs_embeds": torch.zeros(2, 44, 64)}
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        ours(**args)


def test_pixel_values_with_inputs_embeds_are_refused(pair, inputs):
    with pytest.raises(ValueError, match="inputs_embeds already hold the image rows"):
        pair[1](inputs_embeds=torch.zeros(2, 44, 64), pixel_values=inputs["pixel_values"])


@torch.no_grad()
def test_left_padded_batch_outputs_equal_transformers_on_real_positions(pair):
    hf, ours = pair
    gen = torch.Generator().manual_seed(4)
    k = ours.config.num_image_tokens
    short = torch.cat([torch.randint(3, IMAGE_TOKEN_ID, (3,), generator=gen), torch.full((k,), IMAGE_TOKEN_ID)])
    long = torch.randint(3, IMAGE_TOKEN_ID, (len(short) + 5,), generator=gen)
    ids = torch.stack([torch.cat([torch.zeros(5, dtype=torch.long), short]), long])
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    pixels = torch.randn(1, 3, 28, 28, generator=gen)
    theirs = hf(
        input_ids=ids, pixel_values=pixels, attention_mask=mask, output_hidden_states=True, output_attentions=True
    )
    mine = ours(ids, pixels, mask, output_hidden_states=True, output_attentions=True)
    real = mask.bool()
    assert_close(mine.logits[real], theirs.logits[real], **FP32)
    for a, b in zip(mine.hidden_states, theirs.hidden_states, strict=True):
        assert_close(a[real], b[real], **FP32)
    for a, b in zip(mine.attentions, theirs.attentions, strict=True):
        # Rows of real queries; padded keys get probability 0 on both sides.
        assert_close(a[0, :, 5:], b[0, :, 5:], **FP32)
        assert_close(a[1], b[1], **FP32)
        assert (a[0, :, 5:, :5] == 0).all()


@torch.no_grad()
def test_cached_steps_return_attentions_over_the_slots_so_far(pair):
    _, ours = pair
    ids = torch.randint(3, IMAGE_TOKEN_ID, (1, 12), generator=torch.Generator().manual_seed(6))
    full = ours(ids, output_attentions=True, output_hidden_states=True)
    out = ours(ids[:, :9], use_cache=True)
    step = ours(ids[:, 9:], past_key_values=out.past_key_values, output_attentions=True, output_hidden_states=True)
    for a, b in zip(step.attentions, full.attentions, strict=True):
        assert_close(a, b[:, :, 9:], **FP32)
    for a, b in zip(step.hidden_states, full.hidden_states, strict=True):
        assert_close(a, b[:, 9:], **FP32)


def _compile_works() -> str | None:
    try:
        torch.compile(lambda x: x * 2, fullgraph=True)(torch.ones(2))
    except Exception as err:  # no C++ compiler, unsupported platform
        return f"torch.compile is unavailable here: {type(err).__name__}: {err}"
    return None


@pytest.mark.skipif(_compile_works() is not None, reason=str(_compile_works()))
def test_compiled_decode_equals_eager_token_for_token(pair):
    _, ours = pair
    gen = torch.Generator().manual_seed(8)
    k = ours.config.num_image_tokens
    img = torch.full((k,), IMAGE_TOKEN_ID)
    short = torch.cat([torch.randint(3, IMAGE_TOKEN_ID, (4,), generator=gen), img])
    long = torch.cat([torch.randint(3, IMAGE_TOKEN_ID, (7,), generator=gen), img])
    ids = torch.stack([torch.cat([torch.zeros(3, dtype=torch.long), short]), long])
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    pixels = torch.randn(2, 3, 28, 28, generator=gen)
    eager = generate(ours, ids, pixels, mask, max_new_tokens=12, eos_token_id=[])
    compiled = generate(ours, ids, pixels, mask, max_new_tokens=12, eos_token_id=[], compile=True)
    assert compiled.tolist() == eager.tolist()
