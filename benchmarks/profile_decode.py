"""Where the time of one decode step goes, per weight format, on a random LLaMA-7B-shaped decoder slice.

    .venv/bin/python benchmarks/profile_decode.py [--threads 2] [--steps 16] [--formats fp32 bf16 int8 int4]

The slice (two LLaMA-7B blocks, vocabulary 32064, N(0, 0.02) weights) is saved once in fp32 and loaded in each
format (int8 / int4 quantised while loading, bf16 activations). After a 64-token prompt, ``--steps`` eager decode
steps run under ``torch.profiler``; the table gives milliseconds per step by operator (self CPU time), the
weight kernels' share, and the GB/s at which they read the weights.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from quant_quality import random_slice  # noqa: E402

import minillava  # noqa: E402

FORMATS = {
    "fp32": {"dtype": torch.float32},
    "bf16": {"dtype": torch.bfloat16},
    "int8": {"dtype": torch.bfloat16, "quantize": "int8"},
    "int4": {"dtype": torch.bfloat16, "quantize": "int4"},
}
# The operators that multiply by the weights (torch's names as the profiler reports them).
WEIGHT_OPS = ("aten::mm", "aten::addmm", "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu")


def slice_checkpoint(directory: Path) -> Path:
    minillava.save(random_slice(2, sharpened=False), directory / "fp32")
    return directory / "fp32"


def profile_format(path: Path, options: dict, steps: int) -> list[str]:
    model = minillava.load(path, **options)
    llm = model.llm
    weight_bytes = sum(p.numel() * p.element_size() for n, p in llm.named_parameters() if not n.startswith("embed"))
    ids = torch.randint(3, 32000, (1, 64), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(1, 64 + steps + 4)
    with torch.inference_mode():
        out = model(ids, past_key_values=cache, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(2):  # warm-up steps
            token = model(token, past_key_values=cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                token = model(token, past_key_values=cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e3 / steps
    weights = sum(e.self_cpu_time_total for e in events if e.key in WEIGHT_OPS) / 1e3 / steps
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:6]
    ops = ", ".join(f"{e.key.removeprefix('aten::')} {e.self_cpu_time_total / 1e3 / steps:.1f}" for e in top)
    return [f"{total:.1f}", f"{weights:.1f} ({100 * weights / total:.0f}%)", f"{weight_bytes / weights / 1e6:.1f}", ops]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="profile-decode-") as tmp:
        path = slice_checkpoint(Path(tmp))
        for name in args.formats:
            rows.append(f"| {name} | " + " | ".join(profile_format(path, FORMATS[name], args.steps)) + " |")
            print(rows[-1], flush=True)
    load = os.getloadavg()[0]
    print(f"\n{args.threads} threads, {args.steps} decode steps after 64 tokens, load average {load:.1f}\n")
    print("| weights | ms per step | weight kernels ms (share) | their GB/s | top operators, ms per step |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
