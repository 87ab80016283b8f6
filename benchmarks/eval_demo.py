"""Held-out accuracy of the bundled shapes model: greedy exact match, per question type.

    .venv/bin/python benchmarks/eval_demo.py                          # the README's sets: 3 x 400 fresh images
    .venv/bin/python benchmarks/eval_demo.py --sets 5:0 --images 50   # one set: stream seed 5, images 0..49
    .venv/bin/python benchmarks/eval_demo.py --model DIR
    .venv/bin/python benchmarks/eval_demo.py --quantize int8          # or int4: the same questions, quantised

The images are drawn from the ``heldout`` split's random streams, which training never sees (train images
come from the ``train`` streams); each set is a stream seed and a first index. Every image gets one question
of each askable type, asked on its own in the model's chat template; generation is greedy and batched with
left padding. With several sets it prints each set's table, then the mean and the worst set per type.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

import minillava
from minillava.processor import load_processor
from minillava.shapes.recipe import ASSET_DIR, evaluate, format_scores

# Stream seed and first index of the sets the README reports; none of them was looked at while tuning the recipe.
README_SETS = ("101:0", "102:20000", "103:40000")


def parse_set(text: str) -> tuple[int, int]:
    """``"SEED:START"`` -> ``(seed, start)``."""
    try:
        seed, start = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a set is SEED:START (two integers, e.g. 101:0), got {text!r}") from None
    if start < 0:
        raise argparse.ArgumentTypeError(f"a set's first index must be >= 0, got {text!r}")
    return seed, start


def summary(per_set: list[dict[str, tuple[int, int]]]) -> str:
    """Mean and worst accuracy over the sets, per question type."""
    width = max(10, *map(len, per_set[0]))
    lines = [f"{'qtype':<{width}} {'mean':>7} {'worst':>7}"]
    for key in per_set[0]:
        accuracies = [scores[key][0] / scores[key][1] for scores in per_set if key in scores]
        lines.append(f"{key:<{width}} {100 * sum(accuracies) / len(accuracies):>6.1f}% {100 * min(accuracies):>6.1f}%")
    return "\n".join(lines)


def report_sets(
    sets: list[tuple[int, int]], n_images: int, score: Callable[[int, int], dict[str, tuple[int, int]]]
) -> None:
    """Print ``score(seed, start)``'s table for each set, then, over several sets, the mean and the worst."""
    per_set = []
    for seed, start in sets:
        began = time.perf_counter()
        scores = score(seed, start)
        correct, total = scores["all"]
        print(f"\nheld-out stream {seed}, images {start}..{start + n_images - 1}")
        print(format_scores(scores))
        print(f"overall: {100 * correct / total:.1f}% of {total} questions ({time.perf_counter() - began:.0f}s)")
        per_set.append(scores)
    if len(per_set) > 1:
        print(f"\nover {len(per_set)} sets of {n_images} images")
        print(summary(per_set))


def add_set_arguments(p: argparse.ArgumentParser, images_help: str) -> None:
    """``--model``, ``--sets``, ``--images``, ``--batch-size`` and ``--threads``: what every held-out score takes."""
    p.add_argument("--model", default=str(ASSET_DIR), help="checkpoint directory (default: the bundled model)")
    p.add_argument(
        "--sets", nargs="+", type=parse_set, default=[parse_set(s) for s in README_SETS], metavar="SEED:START"
    )
    p.add_argument("--images", type=int, default=400, help=images_help)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)


def main(argv: list[str] | None = None) -> int:
    """Print the per-question-type table of each set, then the mean and the worst over the sets."""
    p = argparse.ArgumentParser(description="held-out accuracy of the bundled shapes model")
    add_set_arguments(p, images_help="held-out images per set (about 5.5 questions each)")
    p.add_argument("--quantize", choices=("int8", "int4"), help="quantise the decoder's linear layers as it loads")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="weights' dtype (default: as stored)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    model = minillava.load(args.model, dtype=dtype, quantize=args.quantize)
    processor = load_processor(args.model)
    print(
        f"model: {args.model} ({args.dtype or 'stored dtype'}, {args.quantize or 'not quantised'}); greedy, exact match"
    )

    def score(seed: int, start: int) -> dict[str, tuple[int, int]]:
        return evaluate(model, processor, args.images, seed=seed, batch_size=args.batch_size, start=start)

    report_sets(args.sets, args.images, score)
    return 0


if __name__ == "__main__":
    sys.exit(main())
