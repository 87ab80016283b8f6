"""Scoring held-out samples during training (``--eval-data``): the loss, and exact match on short answers.

The loss is the training loss (sum over supervised tokens / their count) on every eval sample, without
gradients. Exact match asks the model for the last answer of each sample whose reference is short (at most
:data:`SHORT_ANSWER_WORDS` words: the VQA-style answers where matching text is a fair score): greedy generation
from the conversation up to that answer, cut at the template's stop strings, compared with the reference after
lower-casing, dropping a final period and collapsing whitespace. Under several processes only the loss is
computed (each process scores the whole set, so the sharded model's collectives line up); generation needs the
whole model in one process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..chat import get_template
from ..data import Collator, LlavaDataset
from ..generate import generate, resolve_eos
from ..model import IGNORE_INDEX, Llava, causal_lm_loss
from ..tokenizer import pad_batch

SHORT_ANSWER_WORDS = 5


@dataclass(frozen=True)
class EvalResult:
    """One evaluation: mean loss over supervised tokens, and exact matches among the short answers."""

    loss: float
    tokens: int
    exact: int
    short: int

    def summary(self) -> str:
        text = f"eval loss {self.loss:.4f} over {self.tokens} tokens"
        if self.short:
            text += f", exact match {self.exact}/{self.short} short answers ({100 * self.exact / self.short:.1f}%)"
        return text


def normalize(text: str) -> str:
    return " ".join(text.lower().strip().removesuffix(".").split())


def last_answer_span(labels: torch.Tensor) -> tuple[int, int] | None:
    """``(start, end)`` of the last run of supervised positions (the last answer and its end-of-turn token)."""
    supervised = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
    if not supervised:
        return None
    end = supervised[-1] + 1
    start = end - 1
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start, end


def summed_loss(model: Llava, batch: dict[str, Any], autocast, device: torch.device) -> torch.Tensor:
    """The summed token loss of one collated batch (:class:`~minillava.data.Collator`), as training computes it."""
    pixels = batch["pixel_values"]
    with autocast:
        logits = model(
            batch["input_ids"].to(device),
            None if pixels is None else pixels.to(device),
            batch["attention_mask"].to(device),
            image_sizes=batch.get("image_sizes"),
        ).logits
    return causal_lm_loss(logits, batch["labels"], reduction="sum")


@torch.no_grad()
def evaluate(
    model: Llava,
    dataset: LlavaDataset,
    batch_size: int,
    autocast,
    device: torch.device,
    exact_match: bool = True,
) -> EvalResult:
    """Score ``dataset`` (see the module docstring); the model is put back in training mode afterwards."""
    collate = Collator(dataset.processor.pad_token_id)
    items = [item for item in (dataset[i] for i in range(len(dataset))) if item is not None]
    model.eval()
    try:
        loss_sum, tokens = 0.0, 0
        for i in range(0, len(items), batch_size):
            batch = collate(items[i : i + batch_size])
            loss_sum += float(summed_loss(model, batch, autocast, device))
            tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        exact, short = _exact_matches(model, dataset, items, batch_size, autocast) if exact_match else (0, 0)
    finally:
        model.train()
    return EvalResult(loss_sum / tokens if tokens else math.nan, tokens, exact, short)


def _cut(text: str, stops: tuple[str, ...]) -> str:
    for stop in stops:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text


def _exact_matches(
    model: Llava, dataset: LlavaDataset, items: list[dict[str, Any]], batch_size: int, autocast
) -> tuple[int, int]:
    """(matches, short answers): the model's greedy answer against each short reference answer."""
    processor = dataset.processor
    stops = get_template(dataset.template or processor.template).stop_strings
    cases = []  # (the sample with its ids cut before the last answer, the reference text, its length in tokens)
    for item in items:
        labels, ids = torch.as_tensor(item["labels"]), torch.as_tensor(item["input_ids"])
        span = last_answer_span(labels)
        if span is None:
            continue
        reference = normalize(_cut(processor.decode(ids[span[0] : span[1]]), stops))
        if not reference or len(reference.split()) > SHORT_ANSWER_WORDS:
            continue
        # Every image of a sample comes before its last answer: the prompt keeps them all.
        cases.append(({**item, "input_ids": ids[: span[0]], "labels": ids[: span[0]]}, reference, span[1] - span[0]))
    eos = resolve_eos(model, None)
    eos += [i for i in (processor.tokenizer.token_to_id(s) for s in stops) if i is not None and i not in eos]
    context = model.config.text.max_position_embeddings
    collate = Collator(processor.pad_token_id)
    exact = 0
    for i in range(0, len(cases), batch_size):
        batch = cases[i : i + batch_size]
        images = collate([c[0] for c in batch])  # the images as training batches them; the ids left-padded here
        ids, mask = pad_batch([c[0]["input_ids"] for c in batch], processor.pad_token_id, "left")
        room = min(max(c[2] for c in batch) + 8, context - ids.shape[1])
        if room < 1:
            continue
        with autocast:
            out = generate(
                model,
                ids,
                images["pixel_values"],
                mask,
                image_sizes=images.get("image_sizes"),
                max_new_tokens=room,
                eos_token_id=eos,
            )
        for row, case in zip(out, batch, strict=True):
            exact += normalize(_cut(processor.decode(row), stops)) == case[1]
    return exact, len(cases)
