"""Training data loader speed: seconds to load and collate one batch of LLaVA-format samples.

    .venv/bin/python benchmarks/bench_loader.py                # 32-sample batches of the demo's QA set

Writes a small shapes training set (multi-turn QA, the bundled model's template and tokenizer) to a temporary
directory, then times ``LlavaDataset`` + ``Collator`` (PNG decode, preprocessing, chat template, tokenisation
with answer masks, padding) in the main process, as ``minillava train`` does with ``--num-workers 0``.
Prints the median over the batches; the first batches warm up and are not counted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from minillava.data import Collator, LlavaDataset
from minillava.processor import load_processor
from minillava.shapes.data import IMAGE_SIZE, generate_dataset
from minillava.shapes.recipe import ASSET_DIR, SEED, TEMPLATE

WARMUP_BATCHES = 2


def main(argv: list[str] | None = None) -> int:
    """Print the median load + collate time per batch."""
    p = argparse.ArgumentParser(description="training data loader speed")
    p.add_argument("--batches", type=int, default=20, help="timed batches")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    processor = load_processor(ASSET_DIR)
    n = (args.batches + WARMUP_BATCHES) * args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        paths = generate_dataset(Path(tmp), n, SEED, "train", IMAGE_SIZE)
        dataset = LlavaDataset(paths["qa"], tmp, processor, template=TEMPLATE)
        collate = Collator(processor.pad_token_id)
        times = []
        for b in range(args.batches + WARMUP_BATCHES):
            start = time.perf_counter()
            batch = collate([dataset[i] for i in range(b * args.batch_size, (b + 1) * args.batch_size)])
            if b >= WARMUP_BATCHES:
                times.append(time.perf_counter() - start)
    tokens = int(batch["attention_mask"].sum())
    print(
        f"{args.batch_size}-sample batches, {args.threads} thread(s): "
        f"median {statistics.median(times):.4f} s per batch over {len(times)} (last batch {tokens} tokens)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
