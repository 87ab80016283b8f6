"""The matrix products of one decode step and of a prefill, kernel by kernel, on LLaMA-7B shapes.

    .venv/bin/python benchmarks/bench_kernels.py [--threads 2] [--rounds 15] [--compile]

Decoding reads every weight once per token, so a one-row product should run at the memory's speed: each row of the
table gives ms per call and GB/s of weights read, next to a large tensor copy (bytes read + written). Prefill rows
(512 tokens) give GFLOP/s. Candidates run round-robin (one call each per round, medians), so machine noise hits all
alike; each is checked against fp64 ``F.linear`` on the weights it holds (max difference relative to the largest
output) before it is timed. This is how minillava's kernels were chosen (see ``docs/speed.md``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from minillava import quant  # noqa: E402
from minillava.linear import gemm_dtype, tiled_linear  # noqa: E402

SHAPES = {"gate/up 4096->11008": (11008, 4096), "down 11008->4096": (4096, 11008), "head 4096->32064": (32064, 4096)}


def candidates(n: int, k: int, rows: int, compile: bool) -> dict[str, tuple[Callable, torch.Tensor, int]]:
    """name -> (call, fp32 weight it computes with, bytes of weights it reads). Every call multiplies
    :func:`activations` in its dtype."""
    w32 = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02
    x32 = activations(rows, k)
    out: dict[str, tuple[Callable, torch.Tensor, int]] = {}
    for dtype in (torch.float32, torch.bfloat16):
        label = "fp32" if dtype == torch.float32 else "bf16"
        w, x = w32.to(dtype), x32.to(dtype)
        out[f"{label} F.linear"] = (lambda w=w, x=x: F.linear(x, w), w.float(), w.nbytes)
        if rows == 1:
            out[f"{label} torch.mv"] = (lambda w=w, x=x: torch.mv(w, x[0]), w.float(), w.nbytes)
        if dtype == torch.float32:
            packed = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
            out[f"{label} mkl prepacked"] = (
                lambda w=w, x=x, p=packed: torch.ops.mkl._mkl_linear(x, p, w, None, rows),
                w,
                w.nbytes,
            )
        if dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported():
            packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
            out[f"{label} onednn prepacked"] = (
                lambda x=x, p=packed: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""),
                w.float(),
                w.nbytes,
            )
        if dtype == torch.bfloat16 and rows > quant.FUSED_ROWS:
            up = gemm_dtype(dtype, "cpu")
            out["bf16 via upcast tiles"] = (
                lambda w=w, x=x: tiled_linear(x, n, lambda a, b, tile: tile.copy_(w[a:b])),
                w.float(),
                w.nbytes,
            )
            if up == dtype:
                del out["bf16 via upcast tiles"]  # this CPU multiplies bf16 natively: nothing to upcast
        if compile:
            import torch._inductor.config as inductor

            inductor.max_autotune = True
            inductor.max_autotune_gemm_backends = "CPP,ATEN"
            linear = nn.Linear(k, n, bias=False).to(dtype).requires_grad_(False)
            linear.weight.copy_(w)
            fn = torch.compile(linear, dynamic=False)
            out[f"{label} compiled (max-autotune CPP)"] = (lambda fn=fn, x=x: fn(x), w.float(), w.nbytes)
    # Measured and not used: fp16 weights through FBGEMM (a deprecated API; it changes the stored dtype) and int8
    # weights with dynamically quantised activations (not weight-only: the activations lose precision too).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        packed16 = torch.fbgemm_pack_gemm_matrix_fp16(w32)
        zero = torch.zeros(n)
        out["fp16 weights, FBGEMM (not used)"] = (
            lambda: torch.fbgemm_linear_fp16_weight_fp32_activation(x32, packed16, zero),
            w32.half().float(),
            n * k * 2,
        )
    dynamic = torch.ao.nn.quantized.dynamic.Linear(k, n, bias_=False, dtype=torch.qint8)
    step = (w32.abs().amax(1) / 127).double()
    dynamic.set_weight_bias(
        torch.quantize_per_channel(w32, step, torch.zeros(n, dtype=torch.long), 0, torch.qint8), None
    )
    out["int8 W8A8 dynamic, FBGEMM (not used)"] = (lambda: dynamic(x32), dynamic.weight().dequantize(), n * k)
    xb = x32.bfloat16()
    linear = nn.Linear(k, n, bias=False).requires_grad_(False)
    linear.weight.copy_(w32)
    for scheme in quant.SCHEMES:
        layer = quant.LAYERS[scheme].from_linear(linear.bfloat16())
        nbytes = sum(p.nbytes for p in layer.parameters())
        reference = layer.dequantize(dtype=torch.float32)
        out[f"{scheme} minillava layer"] = (lambda layer=layer: layer(xb), reference, nbytes)
    return out


def activations(rows: int, k: int) -> torch.Tensor:
    return torch.randn(rows, k, generator=torch.Generator().manual_seed(1))


def bench(
    n: int, k: int, rows: int, rounds: int, compile: bool, clock=time.perf_counter
) -> list[tuple[str, float, float, float]]:
    """(name, ms, GB/s or GFLOP/s, max relative error) per candidate, plus a copy of the weight's fp32 size."""
    cands = candidates(n, k, rows, compile)
    x32 = activations(rows, k)
    errors = {}
    for name, (fn, weight, _) in cands.items():
        got = fn().double().reshape(rows, n)
        x = x32.to(torch.float32 if name.startswith("fp32") else torch.bfloat16).double()
        want = F.linear(x, weight.double())
        errors[name] = float((got - want).abs().max() / want.abs().max())
        fn()
    src = torch.ones(n * k)
    dst = torch.empty_like(src)
    cands["copy (read + write)"] = (lambda: dst.copy_(src), src, 2 * src.nbytes)
    errors["copy (read + write)"] = 0.0
    times: dict[str, list[float]] = {name: [] for name in cands}
    for _ in range(rounds):
        for name, (fn, _, _) in cands.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    result = []
    for name, (_, _, nbytes) in cands.items():
        seconds = statistics.median(times[name])
        rate = nbytes / seconds / 1e9 if rows == 1 or name.startswith("copy") else 2 * rows * n * k / seconds / 1e9
        result.append((name, 1e3 * seconds, rate, errors[name]))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 512], help="rows per call: 1 = decode")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--compile", action="store_true", help="also inductor's CPU GEMM templates (slow to build)")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with the process's CPU clock instead of the wall clock: with --threads 1, what each kernel costs "
        "on a core whatever else the machine runs (time spent descheduled does not count)",
    )
    args = parser.parse_args(argv)
    clock = time.process_time if args.cpu_time else time.perf_counter
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}, "
        f"oneDNN bf16: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}, load average {os.getloadavg()[0]:.1f}, "
        f"{'CPU' if args.cpu_time else 'wall'} clock"
    )
    for rows in args.rows:
        unit = "GB/s of weights" if rows == 1 else "GFLOP/s"
        for shape in args.shapes:
            n, k = SHAPES[shape]
            print(f"\n{shape}, {rows} row(s)\n\n| kernel | ms | {unit} | max rel. error |\n|---|---|---|---|")
            for name, ms, rate, err in bench(n, k, rows, args.rounds if rows == 1 else 3, args.compile, clock):
                print(f"| {name} | {ms:.2f} | {rate:.1f} | {err:.1e} |", flush=True)
    print(f"\n(load average now {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
