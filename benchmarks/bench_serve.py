"""``minillava serve``: continuous batching against one-at-a-time serving, with concurrent streaming clients.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_serve.py [--shapes bundled 7b-slice] [--clients 1 4 16]

Two servers run side by side as ``minillava serve`` processes on the same weights: one with ``--slots 16``
(continuous batching) and one with ``--slots 1`` (each request waits for the one before: one-at-a-time serving).
For each number of clients the two are measured alternately, ``--repeats`` times. Each client is a loop in this
process (asyncio, one streaming connection each) that sends ``--requests`` image questions one after the other
and records, per request, the time to the first answer text (TTFT) and the completion tokens (``usage``).

Both servers get the same requests: answer lengths drawn from a seed between half and 1.5 times ``--max-tokens``
(``max_tokens`` with ``ignore_eos``), and clients that start spread over the time one request takes alone, as
independent users do. (Clients that all start at once with equal lengths stay in lock step: every request arrives
in a burst of N, and the last of a burst waits for N prefills, since each request is prefilled alone. ``--burst``
measures that case.)

- tok/s: completion tokens of all clients over the wall time of the run (median of the repeats);
- TTFT p50 / p95: over every request of every repeat, and p95 over the requests after each client's first (the
  first ones arrive while the clients are still starting);
- the targets: 16 clients batched >= 4x the tokens/s of one-at-a-time serving, and their p95 TTFT < 2x the
  single-client figure (both on the batching server).

Shapes: ``bundled`` is the shipped shapes model; ``7b-slice`` is CLIP ViT-L/14-336 with two LLaMA-7B-sized decoder
layers and llava-hf's vocabulary (random weights, built with transformers and converted as in
``bench_generate.py``, with the bundled tokenizer beside them and its ``<image>`` id). A benchmark, never a test:
the figures depend on the machine and on whatever else runs on it (the load average is printed before and after).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minillava.config import BUNDLED_MODEL  # noqa: E402

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
QUESTIONS = ("Describe the image briefly.", "How many shapes are there?", "What shape is the blue object?")


@dataclass(frozen=True)
class Setting:
    max_tokens: int
    requests: int  # per client
    repeats: int
    burst: bool = False


DEFAULTS = {"bundled": Setting(32, 4, 3), "7b-slice": Setting(16, 1, 1)}


def build_7b_slice(workdir: Path) -> Path:
    """The 7b-slice weights of bench_generate.py, converted, with the bundled tokenizer beside them."""
    from bench_generate import SHAPES, build_reference

    # The image placeholder is the bundled tokenizer's <image> piece, so that config and tokenizer agree.
    shape = dataclasses.replace(SHAPES["7b-slice-fp32"], image_token_id=3)
    hf, path = build_reference(shape, workdir)
    del hf
    for name in TOKENIZER_FILES:
        shutil.copy(BUNDLED_MODEL / name, path / name)
    return path


@contextlib.contextmanager
def server(model: Path, slots: int, threads: int, log: Path):
    """``minillava serve --slots N`` on a free port; yields its URL."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "minillava", "serve", "--model", str(model), "--port", "0", "--slots", str(slots)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    try:
        while not (found := re.search(rb"on (http://\S+) \(", log.read_bytes())):
            if proc.poll() is not None:
                raise SystemExit(f"the server did not start:\n{log.read_text()}")
            time.sleep(0.2)
        url = found.group(1).decode()
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def request_bodies(max_tokens: int, count: int) -> list[dict]:
    """``count`` requests: the questions about the example images in turn, streamed with a usage chunk, answers of
    seeded lengths between ``max_tokens // 2`` and ``3 * max_tokens // 2``."""
    rng = random.Random(0)
    kinds = []
    for question in QUESTIONS:
        for i in (1, 2, 3):
            png = (BUNDLED_MODEL / f"example-{i}.png").read_bytes()
            url = "data:image/png;base64," + base64.b64encode(png).decode()
            kinds.append([{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}])
    bodies = []
    for n in range(count):
        length = rng.randint(max_tokens // 2, 3 * max_tokens // 2)
        messages = [{"role": "user", "content": kinds[n % len(kinds)]}]
        bodies.append({"messages": messages, "stream": True, "max_tokens": length, "ignore_eos": True})
        bodies[-1]["stream_options"] = {"include_usage": True}
    return bodies


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, int]:
    """(TTFT in seconds, completion tokens) of one streamed request."""
    start = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"HTTP {response.status_code}: {await response.aread()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first if first is not None else time.perf_counter() - start, tokens


async def run_clients(
    url: str, clients: int, setting: Setting, bodies: list[dict], spread: float
) -> tuple[float, list[float]]:
    """(tokens/s over the run, every request's (TTFT, whether it was its client's first)); client ``i`` starts
    ``i / clients * spread`` seconds in."""
    ttfts: list[tuple[float, bool]] = []
    total = 0

    async def client_loop(index: int, client: httpx.AsyncClient) -> None:
        nonlocal total
        await asyncio.sleep(0 if setting.burst else index / clients * spread)
        for r in range(setting.requests):
            ttft, tokens = await one_request(client, url, bodies[index * setting.requests + r])
            ttfts.append((ttft, r == 0))
            total += tokens

    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=clients + 4)) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
        wall = time.perf_counter() - start
    return total / wall, ttfts


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def bench_shape(name: str, model: Path, args, logdir: Path) -> list[dict]:
    setting = DEFAULTS[name]
    setting = Setting(
        args.max_tokens or setting.max_tokens,
        args.requests or setting.requests,
        args.repeats or setting.repeats,
        args.burst,
    )
    bodies = request_bodies(setting.max_tokens, max(args.clients) * setting.requests)
    rows = []
    with (
        server(model, args.slots, args.threads, logdir / f"{name}-batched.log") as batched,
        server(model, 1, args.threads, logdir / f"{name}-single.log") as single,
    ):
        one = Setting(setting.max_tokens, 1, 1)
        asyncio.run(run_clients(batched, 2, one, bodies, 0))  # warm-up
        start = time.perf_counter()
        for _ in range(3):
            asyncio.run(run_clients(single, 1, one, bodies, 0))
        spread = (time.perf_counter() - start) / 3  # one request, alone
        print(f"{name}: one request alone takes {spread:.2f} s; clients start spread over that")
        for clients in args.clients:
            results = {"one-at-a-time": ([], []), f"batched ({args.slots} slots)": ([], [])}
            for _ in range(setting.repeats):
                for mode, url in zip(results, (single, batched), strict=True):
                    rate, ttfts = asyncio.run(run_clients(url, clients, setting, bodies, spread))
                    results[mode][0].append(rate)
                    results[mode][1].extend(ttfts)
            for mode, (rates, ttfts) in results.items():
                every = [t for t, _ in ttfts]
                later = [t for t, first in ttfts if not first] or every
                rows.append(
                    dict(
                        shape=name,
                        mode=mode,
                        clients=clients,
                        requests=len(ttfts),
                        tok_s=statistics.median(rates),
                        p50=percentile(every, 50),
                        p95=percentile(every, 95),
                        p95_later=percentile(later, 95),
                    )
                )
    return rows


def report(rows: list[dict], slots: int) -> None:
    print(
        "| shape | serving | clients | requests | tok/s | vs one-at-a-time | TTFT p50 ms | TTFT p95 ms "
        "| p95 after each client's first ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        single = next(s for s in rows if s["shape"] == r["shape"] and s["clients"] == r["clients"])
        print(
            f"| {r['shape']} | {r['mode']} | {r['clients']} | {r['requests']} | {r['tok_s']:.1f} | "
            f"{r['tok_s'] / single['tok_s']:.2f}x | {r['p50'] * 1e3:.0f} | {r['p95'] * 1e3:.0f} | "
            f"{r['p95_later'] * 1e3:.0f} |"
        )
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = [r for r in rows if r["shape"] == shape]
        batched = {r["clients"]: r for r in mine if r["mode"].startswith("batched")}
        single = {r["clients"]: r for r in mine if r["mode"] == "one-at-a-time"}
        most, one = max(batched), min(batched)
        speedup = batched[most]["tok_s"] / single[most]["tok_s"]
        ttft = batched[most]["p95"] / batched[one]["p95"]
        later = batched[most]["p95_later"] / batched[one]["p95"]
        print(
            f"\n{shape}: {most} clients batched get {speedup:.2f}x the tokens/s of one-at-a-time serving"
            f" (target >= 4x); their p95 TTFT is {ttft:.2f}x the {one}-client figure (target < 2x), {later:.2f}x"
            " after each client's first request"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(DEFAULTS), default=["bundled"])
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--slots", type=int, default=16, help="rows of the batching server (default: 16)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--max-tokens", type=int, help="tokens per answer (default: 32 bundled, 16 7b-slice)")
    parser.add_argument("--requests", type=int, help="requests per client (default: 4 bundled, 1 7b-slice)")
    parser.add_argument("--repeats", type=int, help="alternating repeats (default: 3 bundled, 1 7b-slice)")
    parser.add_argument("--burst", action="store_true", help="all clients start at once (the worst case for TTFT)")
    args = parser.parse_args(argv)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {args.threads} torch threads")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        for name in args.shapes:
            model = BUNDLED_MODEL if name == "bundled" else build_7b_slice(Path(tmp))
            rows += bench_shape(name, model, args, Path(tmp))
    print()
    report(rows, args.slots)
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
