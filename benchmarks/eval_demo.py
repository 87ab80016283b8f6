"""Held-out accuracy of the bundled shapes model: greedy exact match, per question type.

    .venv/bin/python benchmarks/eval_demo.py                 # 200 fresh held-out images, the bundled model
    .venv/bin/python benchmarks/eval_demo.py --model DIR --images 50
    .venv/bin/python benchmarks/eval_demo.py --quantize int8      # or int4: the same questions, quantised weights

The images are drawn from the ``heldout`` split's random streams, which training never sees (train images
come from the ``train`` streams). Every image gets one question of each askable type, asked on its own in
the model's chat template; generation is greedy and batched with left padding.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import minillava
from minillava.processor import load_processor
from minillava.shapes.recipe import ASSET_DIR, SEED, evaluate, format_scores


def main(argv: list[str] | None = None) -> int:
    """Print the per-question-type table and the overall figure."""
    p = argparse.ArgumentParser(description="held-out accuracy of the bundled shapes model")
    p.add_argument("--model", default=str(ASSET_DIR), help="checkpoint directory (default: the bundled model)")
    p.add_argument("--images", type=int, default=200, help="held-out images (about 5.5 questions each)")
    p.add_argument("--start", type=int, default=0, help="first held-out image index")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quantize", choices=("int8", "int4"), help="quantise the decoder's linear layers as it loads")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="weights' dtype (default: as stored)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    model = minillava.load(args.model, dtype=dtype, quantize=args.quantize)
    processor = load_processor(args.model)
    start = time.perf_counter()
    scores = evaluate(model, processor, args.images, seed=args.seed, batch_size=args.batch_size, start=args.start)
    correct, total = scores["all"]
    print(f"model: {args.model} ({args.dtype or 'stored dtype'}, {args.quantize or 'not quantised'})")
    print(f"held-out images {args.start}..{args.start + args.images - 1} (seed {args.seed}), greedy, exact match")
    print(format_scores(scores))
    print(f"overall: {100 * correct / total:.1f}% of {total} questions ({time.perf_counter() - start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
