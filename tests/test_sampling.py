"""Logit filtering against transformers' warpers, including the exact top-p boundary."""

from __future__ import annotations

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from minillava.generate import process_logits


def transformers_filter(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None):
    for warper in (
        TemperatureLogitsWarper(temperature) if temperature != 1.0 else None,
        TopKLogitsWarper(top_k) if top_k is not None else None,
        TopPLogitsWarper(top_p) if top_p is not None else None,
    ):
        if warper is not None:
            logits = warper(None, logits)
    return logits


def test_top_p_at_the_exact_boundary_drops_what_transformers_drops():
    # Four equally likely tokens: the smallest set reaching 0.75 is three of them, so exactly one is dropped.
    logits = torch.zeros(1, 4)
    ours = process_logits(logits, 1.0, top_p=0.75)
    theirs = transformers_filter(logits, 1.0, None, 0.75)
    assert torch.isinf(theirs).sum() == 1
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, None, 0.9), (0.7, None, 0.5), (1.3, 5, None), (0.8, 10, 0.8), (1.0, 1, None), (2.0, None, 0.05)],
)
def test_filtering_matches_transformers(temperature, top_k, top_p):
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)) * 3
    ours = process_logits(logits, temperature, top_k=top_k, top_p=top_p)
    theirs = transformers_filter(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    kept = ~torch.isinf(theirs)
    torch.testing.assert_close(ours[kept], theirs[kept], rtol=1e-6, atol=1e-6)
