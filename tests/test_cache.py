"""Invariants of the KV cache object and the masks: stepping the cache by hand equals one full forward."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from tests.hf_reference import IMAGE_TOKEN_ID, batch_inputs

FP32 = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def model(hf_reference):
    return hf_reference(seed=11)[1]


def text(n: int, seed: int, rows: int = 1) -> torch.Tensor:
    return torch.randint(3, IMAGE_TOKEN_ID, (rows, n), generator=torch.Generator().manual_seed(seed))


def left_padded_rows(k: int):
    """Three rows (one image, text only, two images) left-padded, their mask, images, and each row alone."""
    gen = torch.Generator().manual_seed(3)
    img = torch.full((k,), IMAGE_TOKEN_ID)
    rows = [
        torch.cat([torch.randint(3, IMAGE_TOKEN_ID, (5,), generator=gen), img, torch.tensor([7, 8])]),
        torch.randint(3, IMAGE_TOKEN_ID, (9,), generator=gen),
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
    return rows, ids, mask, pixels, images_per_row


@torch.no_grad()
def test_prefill_in_chunks_then_single_tokens_equals_full_forward(model):
    inputs = batch_inputs(model.config.num_image_tokens, seed=1)
    ids = torch.cat([inputs["input_ids"], text(6, 5, rows=2)], dim=1)
    pixels = inputs["pixel_values"]
    full = model(ids, pixel_values=pixels).logits
    t, first = ids.shape[1], inputs["input_ids"].shape[1]  # the images lie in the first chunk
    cache = model.new_cache(batch=2, max_len=t + 3)
    got = [model(ids[:, :first], pixels, past_key_values=cache).logits]
    got.append(model(ids[:, first : t - 3], past_key_values=cache).logits)  # a second chunk of 3
    assert cache.filled == t - 3
    for pos in range(t - 3, t):
        out = model(ids[:, pos : pos + 1], past_key_values=cache)
        assert out.past_key_values is cache
        got.append(out.logits)
    assert cache.filled == t
    assert_close(torch.cat(got, dim=1), full, **FP32)


@torch.no_grad()
def test_use_cache_without_a_cache_returns_one_that_continues(model):
    ids = text(20, 2)
    full = model(ids).logits
    out = model(ids[:, :12], use_cache=True)
    cache = out.past_key_values
    assert cache.filled == 12 and cache.max_len == 12
    rest = [model(ids[:, i : i + 1], past_key_values=cache).logits for i in range(12, 20)]  # the cache grows
    assert cache.filled == 20 and cache.max_len >= 20
    assert_close(torch.cat([out.logits, *rest], dim=1), full, **FP32)


@torch.no_grad()
def test_crop_then_re_extend_equals_recomputation(model):
    ids = text(24, 3)
    other = text(7, 4)
    cache = model(ids, use_cache=True).past_key_values
    cache.crop(15)
    assert cache.filled == 15
    got = model(other, past_key_values=cache).logits
    expected = model(torch.cat([ids[:, :15], other], dim=1)).logits[:, 15:]
    assert_close(got, expected, **FP32)


@torch.no_grad()
def test_copy_is_independent_of_its_source(model):
    ids = text(10, 5)
    a, b = text(4, 6), text(4, 7)
    cache = model(ids, use_cache=True).past_key_values
    cache.grow(20)
    fork = cache.copy()
    got_a = model(a, past_key_values=cache).logits
    got_b = model(b, past_key_values=fork).logits
    assert cache.filled == fork.filled == 14
    assert_close(got_a, model(torch.cat([ids, a], dim=1)).logits[:, 10:], **FP32)
    assert_close(got_b, model(torch.cat([ids, b], dim=1)).logits[:, 10:], **FP32)
    for mine, theirs in zip(cache.keys, fork.keys, strict=True):
        assert not torch.equal(mine[:, :, 10:14], theirs[:, :, 10:14])


def test_crop_refuses_a_length_past_what_is_filled(model):
    cache = model.new_cache(1, 8)
    with pytest.raises(ValueError, match=r"crop needs 0 <= n <= filled \(0\), got 3"):
        cache.crop(3)


@torch.no_grad()
@pytest.mark.parametrize("cached", [False, True], ids=["uncached", "cached"])
def test_left_padded_batch_rows_equal_rows_alone(model, cached):
    rows, ids, mask, pixels, images_per_row = left_padded_rows(model.config.num_image_tokens)
    if cached:
        nxt = torch.tensor([[11], [12], [13]])
        cache = model(ids, pixels, mask, use_cache=True).past_key_values
        step_mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long)], dim=1)
        batched = model(nxt, attention_mask=step_mask, past_key_values=cache).logits[:, -1]
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
            assert_close(batched[i, len(ids[i]) - len(r) :], alone, **FP32)


@torch.no_grad()
def test_a_row_written_into_a_batch_cache_continues_as_alone(model):
    # A request prefilled alone, placed into a running batch so that it ends at the batch's column, then decoded
    # with the batch: exactly what continuous batching does.
    solo_ids, other_ids = text(6, 8), text(11, 9)
    batch_cache = model.new_cache(2, 16)
    model(torch.cat([other_ids, other_ids]), past_key_values=batch_cache)
    solo = model(solo_ids, use_cache=True).past_key_values
    batch_cache.write_row(0, solo, end=batch_cache.filled)
    nxt = torch.tensor([[21], [22]])
    got = model(nxt, past_key_values=batch_cache).logits[:, -1]
    assert_close(got[0], model(torch.cat([solo_ids[0], nxt[0]])[None]).logits[0, -1], **FP32)
    assert_close(got[1], model(torch.cat([other_ids[0], nxt[1]])[None]).logits[0, -1], **FP32)


@torch.no_grad()
def test_fully_padded_row_is_finite(model):
    ids = text(6, 4, rows=2)
    mask = torch.tensor([[1] * 6, [0] * 6])
    out = model(ids, attention_mask=mask).logits
    assert torch.isfinite(out).all()
    assert_close(out[0], model(ids[:1]).logits[0], **FP32)


@torch.no_grad()
def test_decode_step_equals_a_one_token_forward(model):
    rows, ids, mask, pixels, _ = left_padded_rows(model.config.num_image_tokens)
    a = model(ids, pixels, mask, use_cache=True).past_key_values
    a.grow(ids.shape[1] + 4)
    b = a.copy()
    tokens = torch.tensor([[11], [12], [13]])
    step_mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
    expected = model(tokens, attention_mask=step_mask, past_key_values=a).logits[:, -1]
    got = model.decode_step(tokens, torch.tensor([b.filled]), b)
    assert_close(got, expected, **FP32)
    assert torch.equal(a.mask[:, : a.filled], b.mask[:, : a.filled])


@torch.no_grad()
def test_compact_drops_masked_slots_and_rows_continue_as_alone(model):
    # Row 0 joined first, rows 1 and 2 later and longer, so row 0 has masked slots in the middle; row 2 then left.
    a, b, c = text(9, 10), text(4, 11), text(6, 12)
    cache = model.new_cache(3, 32)
    for row, ids, end in ((0, a, 9), (1, b, 14), (2, c, 14)):
        cache.write_row(row, model(ids, use_cache=True).past_key_values, end=end)
    first, second = torch.tensor([[21], [22], [23]]), torch.tensor([[31], [32], [33]])
    model(first, past_key_values=cache)
    cache.compact(rows=[0, 1])
    assert cache.filled == 10  # row 0's 9 + 1 real slots; row 1 has 5
    assert cache.mask[0].tolist() == [True] * 10 + [False] * 22
    assert cache.mask[1].tolist() == [False] * 5 + [True] * 5 + [False] * 22
    assert not cache.mask[2].any()
    got = model(second, past_key_values=cache).logits[:, -1]
    for row, ids in ((0, a), (1, b)):
        alone = torch.cat([ids[0], first[row], second[row]])[None]
        assert_close(got[row], model(alone).logits[0, -1], **FP32)
