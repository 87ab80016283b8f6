"""Invariants of the decoder's KV cache and masks."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from tests.hf_reference import IMAGE_TOKEN_ID, batch_inputs, convert_hf, make_hf_model

FP32 = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    ours, _ = convert_hf(make_hf_model(seed=11), tmp_path_factory.mktemp("cache"))
    return ours


@torch.no_grad()
def test_prefill_then_decode_equals_full_forward(model):
    inputs = batch_inputs(model.config.num_image_tokens, seed=1)
    tail = torch.randint(3, IMAGE_TOKEN_ID, (2, 6), generator=torch.Generator().manual_seed(5))
    ids, pixels = torch.cat([inputs["input_ids"], tail], dim=1), inputs["pixel_values"]
    full = model(ids, pixel_values=pixels).logits
    t = ids.shape[1]
    prefill = t - 5
    model.setup_cache(batch=2, max_len=t + 3)
    try:
        got = [model(ids[:, :prefill], pixel_values=pixels, input_pos=torch.arange(prefill)).logits]
        for pos in range(prefill, t):
            got.append(model(ids[:, pos : pos + 1], input_pos=torch.tensor([pos])).logits)
    finally:
        model.clear_cache()
    assert_close(torch.cat(got, dim=1), full, **FP32)


@torch.no_grad()
def test_chunked_prefill_equals_full_forward(model):
    ids = torch.randint(3, IMAGE_TOKEN_ID, (1, 30), generator=torch.Generator().manual_seed(2))
    full = model(ids).logits
    model.setup_cache(batch=1, max_len=30)
    try:
        chunks = [model(ids[:, a:b], input_pos=torch.arange(a, b)).logits for a, b in ((0, 11), (11, 12), (12, 30))]
    finally:
        model.clear_cache()
    assert_close(torch.cat(chunks, dim=1), full, **FP32)


@torch.no_grad()
@pytest.mark.parametrize("cached", [False, True], ids=["uncached", "cached"])
def test_left_padded_batch_rows_equal_rows_alone(model, cached):
    k = model.config.num_image_tokens
    gen = torch.Generator().manual_seed(3)
    img = torch.full((k,), IMAGE_TOKEN_ID)
    rows = [
        torch.cat([torch.randint(3, IMAGE_TOKEN_ID, (5,), generator=gen), img, torch.tensor([7, 8])]),
        torch.randint(3, IMAGE_TOKEN_ID, (9,), generator=gen),  # text only
        torch.cat([img, torch.tensor([5]), img, torch.randint(3, IMAGE_TOKEN_ID, (6,), generator=gen)]),
    ]
    pixels = torch.randn(3, 3, 28, 28, generator=gen)
    images_per_row = [pixels[:1], None, pixels[1:]]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    if cached:
        model.setup_cache(batch=len(rows), max_len=width + 1)
        nxt = torch.tensor([[11], [12], [13]])
        try:
            model(ids, pixel_values=pixels, attention_mask=mask, input_pos=torch.arange(width))
            step_mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long)], dim=1)
            batched = model(nxt, attention_mask=step_mask, input_pos=torch.tensor([width])).logits[:, -1]
        finally:
            model.clear_cache()
        alone = [
            model(torch.cat([r, nxt[i]])[None], pixel_values=images_per_row[i]).logits[0, -1]
            for i, r in enumerate(rows)
        ]
        assert_close(batched, torch.stack(alone), **FP32)
    else:
        batched = model(ids, pixel_values=pixels, attention_mask=mask).logits
        assert torch.isfinite(batched).all(), "padding positions must not produce NaN"
        for i, r in enumerate(rows):
            alone = model(r[None], pixel_values=images_per_row[i]).logits[0]
            assert_close(batched[i, width - len(r) :], alone, **FP32)


@torch.no_grad()
def test_fully_padded_row_is_finite(model):
    ids = torch.randint(3, IMAGE_TOKEN_ID, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[1] * 6, [0] * 6])
    out = model(ids, attention_mask=mask).logits
    assert torch.isfinite(out).all()
    assert_close(out[0], model(ids[:1]).logits[0], **FP32)
