"""Training step time on this machine: fp32 against bf16 autocast, for the bundled model and a wider decoder.

    .venv/bin/python benchmarks/bench_train_precision.py            # 2 threads, 12 timed steps per setting
    .venv/bin/python benchmarks/bench_train_precision.py --device cuda

What ``minillava train --precision auto`` picks on a device should be the faster of the two. Each step is what
the trainer does (``minillava.train.loop.accumulate_gradients``: forward, loss sum, backward; then AdamW) on a
batch of shapes-set conversations, fp32 master weights either way. The two precisions alternate step by step
on two copies of the same model, so a busy machine slows both alike; the first steps warm up and are not
counted. Prints the median step time of each and the ratio.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import minillava
from minillava.config import BUNDLED_MODEL
from minillava.data import Collator, LlavaDataset
from minillava.model import IGNORE_INDEX, Llava
from minillava.processor import load_processor
from minillava.shapes.data import IMAGE_SIZE, generate_dataset
from minillava.train.loop import accumulate_gradients, build_optimizer, set_trainable

WARMUP = 3


def wider(model: Llava) -> Llava:
    """The bundled model's tower and tokenizer with a 1024-wide, 4-layer decoder (random weights)."""
    config = copy.deepcopy(model.config)
    t = config.text
    t.hidden_size, t.intermediate_size, t.num_layers, t.num_heads, t.num_kv_heads, t.head_dim = (
        1024,
        2816,
        4,
        16,
        16,
        64,
    )
    torch.manual_seed(0)
    return Llava(config)


def time_steps(models: dict[str, Llava], batch: dict, steps: int, device: torch.device) -> dict[str, list[float]]:
    runs = {}
    for precision, model in models.items():
        model.to(device)
        set_trainable(model, "finetune")
        model.train()
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        runs[precision] = (model, build_optimizer(model, 2e-5, 0.0), autocast)
    supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    times: dict[str, list[float]] = {p: [] for p in models}
    for step in range(WARMUP + steps):
        for precision, (model, optimizer, autocast) in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            accumulate_gradients(model, [batch], 1 / supervised, autocast, device)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= WARMUP:
                times[precision].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="training step time, fp32 against bf16 autocast")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    processor = load_processor(BUNDLED_MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        paths = generate_dataset(Path(tmp), args.batch_size, 0, "train", IMAGE_SIZE)
        dataset = LlavaDataset(paths["qa"], tmp, processor, template="vicuna_v1")
        batch = Collator(processor.pad_token_id)([dataset[i] for i in range(args.batch_size)])
    bundled = minillava.load(BUNDLED_MODEL, dtype=torch.float32)
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    print(f"{device}, {args.threads} thread(s), batch {args.batch_size} ({int(batch['attention_mask'].sum())} tokens)")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in load)}")
    for name, model in (("bundled model (2.8 M)", bundled), ("1024-wide 4-layer decoder", wider(bundled))):
        models = {"fp32": model, "bf16": copy.deepcopy(model)}
        times = time_steps(models, batch, args.steps, device)
        fp32, bf16 = (statistics.median(times[k]) for k in ("fp32", "bf16"))
        print(f"  {name:<28} fp32 {fp32 * 1000:8.1f} ms/step   bf16 autocast {bf16 * 1000:8.1f} ms/step   "
              f"bf16/fp32 {bf16 / fp32:.2f}x")  # fmt: skip
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in load)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
