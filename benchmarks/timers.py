"""Per-token timestamps of one generation, for minillava and for transformers (shared by the benchmarks)."""

from __future__ import annotations

import time

import torch

from minillava.generate import stream_generate


class Stamps:
    """A transformers streamer that records when each ``put`` happens (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def time_hf(hf, ids: torch.Tensor, pixels: torch.Tensor, n: int) -> list[float]:
    """Seconds from the call to each new token (``pixels`` None: a text-only prompt)."""
    stamps = Stamps()
    images = {} if pixels is None else {"pixel_values": pixels}
    t0 = time.perf_counter()
    with torch.inference_mode():
        hf.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            **images,
            max_new_tokens=n,
            do_sample=False,
            streamer=stamps,
        )
    return [t - t0 for t in stamps.times[1:]]


def time_ours(model, ids: torch.Tensor, pixels: torch.Tensor, n: int, compile: bool = False) -> list[float]:
    stamps = []
    t0 = time.perf_counter()
    for _ in stream_generate(model, ids, pixels, max_new_tokens=n, eos_token_id=[], compile=compile):
        stamps.append(time.perf_counter())
    return [t - t0 for t in stamps]
