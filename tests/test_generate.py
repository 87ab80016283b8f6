"""Token-level generation: greedy parity with transformers, batching, sampling, stopping, streaming, errors."""

from __future__ import annotations

import pytest
import torch

from minillava.generate import GenerationConfig, generate, process_logits, sample_next, stream_generate
from tests.hf_reference import IMAGE_TOKEN_ID

PAD = 0


@pytest.fixture(scope="module")
def pair(hf_reference):
    hf, ours, _ = hf_reference(seed=21)
    return hf, ours


def text(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, IMAGE_TOKEN_ID, (n,), generator=torch.Generator().manual_seed(seed))


def prompts(k: int) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Three rows of different lengths with 1, 0 and 2 images, and their pixel values."""
    img = torch.full((k,), IMAGE_TOKEN_ID)
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(7))
    rows = [
        torch.cat([text(3, 1), img, text(4, 2)]),
        text(7, 3),
        torch.cat([img, text(2, 4), img, text(5, 5)]),
    ]
    return rows, [pixels[:1], None, pixels[1:]]


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


def hf_greedy(hf, ids, mask, pixels, max_new_tokens, eos):
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=pixels,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=PAD,
            eos_token_id=eos,
            suppress_tokens=[IMAGE_TOKEN_ID],  # minillava never generates the image placeholder
        )
    return out[:, ids.shape[1] :]


def test_greedy_matches_transformers_single_prompt(pair):
    hf, ours = pair
    rows, images = prompts(ours.config.num_image_tokens)
    ids = rows[0][None]
    expected = hf_greedy(hf, ids, torch.ones_like(ids), images[0], 24, eos=None)
    got = generate(ours, ids, images[0], max_new_tokens=24, eos_token_id=[])
    assert got.shape == (1, 24)
    assert got.tolist() == expected.tolist()


def test_greedy_matches_transformers_left_padded_batch(pair):
    hf, ours = pair
    rows, images = prompts(ours.config.num_image_tokens)
    ids, mask = left_pad(rows)
    pixels = torch.cat([p for p in images if p is not None])
    expected = hf_greedy(hf, ids, mask, pixels, 20, eos=None)
    got = generate(ours, ids, pixels, attention_mask=mask, max_new_tokens=20, eos_token_id=[])
    assert got.tolist() == expected.tolist()


def test_each_batch_row_equals_the_prompt_alone(pair):
    _, ours = pair
    rows, images = prompts(ours.config.num_image_tokens)
    ids, mask = left_pad(rows)
    pixels = torch.cat([p for p in images if p is not None])
    batched = generate(ours, ids, pixels, attention_mask=mask, max_new_tokens=16, eos_token_id=[])
    for i, (row, px) in enumerate(zip(rows, images, strict=True)):
        alone = generate(ours, row[None], px, max_new_tokens=16, eos_token_id=[])
        assert batched[i].tolist() == alone[0].tolist(), f"row {i}"


def test_positions_follow_the_attention_mask(pair, monkeypatch):
    # RoPE scores depend on position differences only, so a constant offset would not change tokens: check the
    # positions themselves. A left-padded row starts at 0 on its first real token and counts up each step.
    _, ours = pair
    ids, mask = left_pad([text(5, 1), text(2, 2)])
    seen = []
    rotary = ours.llm.rotary.forward
    monkeypatch.setattr(ours.llm.rotary, "forward", lambda pos, dtype: seen.append(pos.tolist()) or rotary(pos, dtype))
    generate(ours, ids, attention_mask=mask, max_new_tokens=3, eos_token_id=[])
    assert seen == [[[0, 1, 2, 3, 4], [0, 0, 0, 0, 1]], [[5], [2]], [[6], [3]]]


def test_eos_stops_a_row_and_pads_it_like_transformers(pair):
    hf, ours = pair
    rows, images = prompts(ours.config.num_image_tokens)
    ids, mask = left_pad(rows)
    pixels = torch.cat([p for p in images if p is not None])
    free = generate(ours, ids, pixels, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    eos = int(free[1, 3])  # row 1 stops at step 3 (or earlier, if it produced this id before)
    expected = hf_greedy(hf, ids, mask, pixels, 12, eos=eos)
    got = generate(ours, ids, pixels, attention_mask=mask, max_new_tokens=12, eos_token_id=eos)
    assert got.tolist() == expected.tolist()
    stop = free[1].tolist().index(eos)
    assert got[1, stop] == eos and (got[1, stop + 1 :] == PAD).all()
    # The other rows are unaffected by row 1 finishing: each is its free run, up to its own first EOS if any.
    for i in (0, 2):
        row = free[i].tolist()
        end = row.index(eos) + 1 if eos in row else got.shape[1]
        assert got[i, :end].tolist() == row[:end] and (got[i, end:] == PAD).all()


def test_generation_ends_when_every_row_has_finished(pair):
    _, ours = pair
    ids = text(9, 11)[None]
    free = generate(ours, ids, max_new_tokens=10, eos_token_id=[])
    eos = int(free[0, 4])
    stop = free[0].tolist().index(eos)
    got = generate(ours, ids, max_new_tokens=10, eos_token_id=[eos, IMAGE_TOKEN_ID])  # the second never comes
    assert got.tolist() == [free[0, : stop + 1].tolist()]
    # None takes the checkpoint's EOS (id 2 in these configs).
    assert ours.config.text.eos_token_id == 2
    got = generate(ours, ids, max_new_tokens=10)
    tokens = free[0].tolist()
    assert got[0].tolist() == (tokens[: tokens.index(2) + 1] if 2 in tokens else tokens)


def test_stream_yields_the_same_tokens(pair):
    _, ours = pair
    rows, images = prompts(ours.config.num_image_tokens)
    ids, mask = left_pad(rows)
    pixels = torch.cat([p for p in images if p is not None])
    whole = generate(ours, ids, pixels, attention_mask=mask, max_new_tokens=9, temperature=0.8, seed=5)
    steps = list(stream_generate(ours, ids, pixels, attention_mask=mask, max_new_tokens=9, temperature=0.8, seed=5))
    assert all(s.shape == (3,) for s in steps)
    assert torch.stack(steps, dim=1).tolist() == whole.tolist()


def test_seeded_sampling_is_reproducible_and_rows_are_independent(pair):
    _, ours = pair
    rows, images = prompts(ours.config.num_image_tokens)
    ids, mask = left_pad(rows)
    pixels = torch.cat([p for p in images if p is not None])
    kwargs = dict(attention_mask=mask, max_new_tokens=12, temperature=1.3, top_k=40, top_p=0.95)
    a = generate(ours, ids, pixels, seed=1, eos_token_id=[], **kwargs)
    b = generate(ours, ids, pixels, seed=1, eos_token_id=[], **kwargs)
    c = generate(ours, ids, pixels, seed=2, eos_token_id=[], **kwargs)
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()
    # Row 1 finishing early must not change what rows 0 and 2 draw.
    eos = next(t for t in a[1, 2:].tolist() if t not in a[0].tolist() + a[2].tolist())
    d = generate(ours, ids, pixels, seed=1, eos_token_id=eos, **kwargs)
    assert d.shape[1] == 12
    assert d[0].tolist() == a[0].tolist() and d[2].tolist() == a[2].tolist()
    assert (d[1] == PAD).any()


def test_logit_filters_match_transformers():
    from transformers.generation import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    logits[0, :10] = 2.0  # ties at the top-k boundary
    for temperature, top_k, top_p in [(0.7, 5, None), (1.0, None, 0.8), (1.5, 10, 0.5), (0.9, 50, 1.0), (1.0, 3, 0.01)]:
        expected = TemperatureLogitsWarper(temperature)(None, logits)
        if top_k is not None:
            expected = TopKLogitsWarper(top_k)(None, expected)
        if top_p is not None:
            expected = TopPLogitsWarper(top_p)(None, expected)
        got = process_logits(logits, temperature, top_k, top_p)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert (got.isfinite().sum(-1) >= 1).all()


def test_sampling_draws_from_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).expand(40_000, 5)
    gen = torch.Generator().manual_seed(0)
    draws = sample_next(logits, temperature=1.0, top_k=3, generator=gen)
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    expected = torch.tensor([2.0, 1.0, 0.5]).softmax(-1)
    torch.testing.assert_close(freq[:3], expected, atol=0.01, rtol=0)
    assert freq[3:].sum() == 0


def test_prefill_once_and_lm_head_only_where_needed(pair, monkeypatch):
    _, ours = pair
    rows, images = prompts(ours.config.num_image_tokens)
    ids = rows[2][None]
    encodes, logit_rows = [], []
    encode, logits = ours.encode_images, ours.llm.logits
    monkeypatch.setattr(ours, "encode_images", lambda px, *sizes: encodes.append(px.shape[0]) or encode(px, *sizes))
    monkeypatch.setattr(ours.llm, "logits", lambda h: logit_rows.append(tuple(h.shape)) or logits(h))
    cache = ours.new_cache(1, 4)  # too short: generation grows it to fit prompt + max_new_tokens
    out = generate(ours, ids, images[2], max_new_tokens=6, eos_token_id=[], cache=cache)
    assert encodes == [2]  # both images, encoded once, in the prefill
    assert logit_rows == [(1, 1, ours.config.text.hidden_size)] * 6  # one row of logits per generated token
    assert cache.max_len >= ids.shape[1] + 6
    assert cache.filled == ids.shape[1] + 5  # every token fed: the prompt and all answer tokens but the last
    assert not cache.keys[0].is_inference()  # usable by plain no_grad callers too
    assert out.shape == (1, 6)


def test_generation_continues_a_cache_it_is_given(pair):
    _, ours = pair
    first, second = text(9, 12)[None], text(4, 13)[None]
    cache = ours.new_cache(1, 40)
    a = generate(ours, first, max_new_tokens=5, eos_token_id=[], cache=cache)
    cache.crop(first.shape[1])  # keep the prompt only, then continue with other tokens
    b = generate(ours, second, max_new_tokens=5, eos_token_id=[], cache=cache)
    assert b.tolist() == generate(ours, torch.cat([first, second], dim=1), max_new_tokens=5, eos_token_id=[]).tolist()
    assert a.shape == (1, 5)


def test_generated_tokens_are_never_the_image_placeholder(pair):
    _, ours = pair
    head = ours.llm.lm_head.weight
    saved = head[IMAGE_TOKEN_ID].clone()
    with torch.no_grad():
        head[IMAGE_TOKEN_ID] = head.abs().max() * 50  # the placeholder would win every step
    try:
        out = generate(ours, text(5, 14)[None], max_new_tokens=6, eos_token_id=[])
    finally:
        with torch.no_grad():
            head[IMAGE_TOKEN_ID] = saved
    assert IMAGE_TOKEN_ID not in out.tolist()[0]


def test_settings_come_as_a_config_or_as_keywords(pair):
    _, ours = pair
    ids = text(6, 15)[None]
    config = GenerationConfig(max_new_tokens=7, temperature=0.7, top_k=9, seed=4, eos_token_id=[])
    assert (
        generate(ours, ids, config=config).tolist()
        == generate(ours, ids, max_new_tokens=7, temperature=0.7, top_k=9, seed=4, eos_token_id=[]).tolist()
    )
    assert generate(ours, ids, config=config, max_new_tokens=3).shape == (1, 3)  # keywords override the config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0"),
        ({"temperature": -0.5}, "temperature must be a number >= 0 (0 = greedy), got -0.5"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "got 1.5"),
        ({"top_k": 0}, "top_k must be an integer >= 1"),
        ({"seed": 2**64}, "seed must be an integer in [0, 2**64)"),
        ({"eos_token_id": 2.0}, "eos_token_id must be an int, a list of ints, or None; got 2.0"),
        ({"eos_token_id": [2, 500]}, "eos_token_id [500] outside the vocabulary [0, 96)"),
        (
            {"max_new_tokens": 250},
            "the prompt is 18 tokens and max_new_tokens is 250: 268 exceeds the context window of 256",
        ),
        (
            {"pixel_values": torch.zeros(2, 3, 28, 28)},
            "hold 16 image placeholders (id 90) but 2 image(s) give 32 feature rows (16 per image)",
        ),
        ({"pixel_values": None}, "hold 16 image placeholders (id 90) but 0 image(s) give 0 feature rows"),
        ({"pixel_values": torch.zeros(1, 3, 32, 32)}, "pixel_values must be [N, 3, 28, 28], got [1, 3, 32, 32]"),
        ({"attention_mask": torch.tensor([[1] * 17 + [0]])}, "generation needs left padding"),
    ],
)
def test_errors_name_the_numbers(pair, kwargs, message):
    _, ours = pair
    ids = torch.cat([torch.full((16,), IMAGE_TOKEN_ID), text(2, 0)])[None]
    args = {"pixel_values": torch.zeros(1, 3, 28, 28), **kwargs}
    with pytest.raises(ValueError) as err:
        generate(ours, ids, **args)
    assert message in str(err.value)
    with pytest.raises(ValueError):  # streaming checks up front too, before the first token
        stream_generate(ours, ids, **args)
