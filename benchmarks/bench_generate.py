"""minillava generation against transformers' generate, on identical random weights, in one process.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_generate.py [--shapes tiny 7b-slice-fp32 7b-slice-bf16]

Each architecture is built once with transformers (random weights), saved, converted with the production
converter (``python -m weights_convert``) and loaded by minillava; the bf16 run casts the same weights. Both
sides then run the same prompt (BOS, text, one image, text), greedy with EOS disabled, alternating run by run
so that machine noise hits both alike. Timing comes from per-token timestamps: a transformers streamer whose
``put`` records ``time.perf_counter()``, and minillava's ``stream=True`` iterator.

- TTFT: time to first token (image encode + prefill + first token), median of runs with 1 new token;
- decode tok/s: median over runs of N new tokens of ``(N - 1) / (stamp of token N - stamp of token 1)``;
- GB/s: bytes a decode step must read (decoder and lm_head weights, one embedding row, the KV cache) times the
  decode rate, next to the machine's bandwidth measured here (a large tensor copy: bytes read + written);
- chat turn 2: TTFT of a second turn reusing turn one's KV cache (only the new tokens are prefilled, the image
  is not encoded again) against recomputing the whole conversation;
- with ``--compile``, ``generate(..., compile=True)`` against the eager step: steady-state decode tok/s after
  warm-up (alternating), and the compile time of the first call;
- with ``--llamacpp [ROUNDS]``, instead: the 7B decoder slice beside llama.cpp (``benchmarks/llamacpp.py``).

This is a benchmark, never a test: the numbers depend on the machine and on whatever else runs on it (the load
average is printed before and after).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timers import time_hf, time_ours  # noqa: E402

import minillava  # noqa: E402
from minillava.generate import generate, stream_generate  # noqa: E402

TINY_VISION = dict(
    hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, image_size=56, patch_size=14
)
TINY_TEXT = dict(
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
)
# CLIP ViT-L/14 at 336 px, as LLaVA-1.5 uses it; two decoder layers of LLaMA-7B's size with llava-hf's vocabulary.
CLIP_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
)
LLAMA_7B_2_LAYERS = dict(
    vocab_size=32064,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=2,
    num_attention_heads=32,
    num_key_value_heads=32,
)


@dataclass(frozen=True)
class Shape:
    name: str
    arch: str  # shapes with the same arch share weights (built once)
    dtype: torch.dtype
    vision: dict
    text: dict
    image_token_id: int
    prompt_text: int  # text tokens around the image
    new_tokens: int  # N of the decode runs
    runs: int  # timed runs per side and measurement
    chat_runs: int


SHAPES = {
    s.name: s
    for s in (
        Shape("tiny", "tiny", torch.float32, TINY_VISION, TINY_TEXT, 2000, 40, 64, 15, 7),
        Shape("7b-slice-fp32", "7b-slice", torch.float32, CLIP_L_336, LLAMA_7B_2_LAYERS, 32000, 40, 16, 5, 3),
        Shape("7b-slice-bf16", "7b-slice", torch.bfloat16, CLIP_L_336, LLAMA_7B_2_LAYERS, 32000, 40, 16, 5, 3),
    )
}


def build_reference(shape: Shape, workdir: Path):
    """A random-weight transformers LLaVA of ``shape``, and its weights converted to minillava in ``workdir``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from weights_convert.__main__ import main as convert_main

    text = LlamaConfig(**shape.text, rms_norm_eps=1e-5, max_position_embeddings=4096, pad_token_id=0)
    vision = CLIPVisionConfig(**shape.vision, projection_dim=64)
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_index=shape.image_token_id)
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(config).eval()
    hf.generation_config.eos_token_id = None  # every run generates all its tokens, on both sides
    hf.generation_config.pad_token_id = 0
    src, dst = workdir / f"{shape.arch}-hf", workdir / f"{shape.arch}-converted"
    hf.save_pretrained(src)
    if convert_main([str(src), str(dst), "--force"]) != 0:
        raise SystemExit("conversion failed")
    shutil.rmtree(src)
    return hf, dst


def make_inputs(shape: Shape, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    vocab = min(shape.text["vocab_size"], shape.image_token_id)
    before = torch.randint(3, vocab, (8,), generator=gen)
    after = torch.randint(3, vocab, (shape.prompt_text - 8,), generator=gen)
    ids = torch.cat([torch.tensor([1]), before, torch.full((k,), shape.image_token_id), after])[None]
    size = shape.vision["image_size"]
    pixels = torch.randn(1, 3, size, size, generator=gen).to(shape.dtype)
    return ids, pixels


def decode_rate(stamps: list[float]) -> float:
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def memory_bandwidth(mib: int = 1024, reps: int = 7) -> float:
    """GB/s of a large tensor copy (bytes read + bytes written), median of ``reps``."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def decode_bytes(model, context: int) -> int:
    """Bytes one decode step reads: the decoder's weights except the embedding table (one row of it), the lm_head,
    and keys and values of ``context`` slots."""
    llm = model.llm
    size = llm.embed_tokens.weight.element_size()
    weights = sum(p.numel() * p.element_size() for name, p in llm.named_parameters() if "embed_tokens" not in name)
    weights += llm.config.hidden_size * size
    if llm.lm_head is None:
        weights += llm.embed_tokens.weight.numel() * size
    c = llm.config
    return weights + 2 * c.num_layers * c.num_kv_heads * c.head_dim * context * size


def chat_turn(model, ids: torch.Tensor, pixels: torch.Tensor, answer: int, follow_up: int, runs: int):
    """TTFT of turn two, continuing turn one's KV cache vs recomputing everything. Token level, as Conversation
    runs it: turn two = turn one's prompt + its answer + ``follow_up`` new tokens; the cache holds all but the
    answer's last token (which was never fed)."""
    cache = model.new_cache(1, ids.shape[1] + answer + follow_up + 8)
    first = torch.cat([ids, generate(model, ids, pixels, max_new_tokens=answer, eos_token_id=[], cache=cache)], dim=1)
    tail = torch.randint(3, 1000, (1, follow_up), generator=torch.Generator().manual_seed(1))
    conversation = torch.cat([first, tail], dim=1)
    reuse, full = [], []
    for _ in range(runs):
        turn_one = cache.copy()
        t0 = time.perf_counter()
        next(stream_generate(model, conversation[:, turn_one.filled :], max_new_tokens=8, cache=turn_one))
        reuse.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        next(stream_generate(model, conversation, pixels, max_new_tokens=8, eos_token_id=[]))
        full.append(time.perf_counter() - t0)
    return statistics.median(reuse), statistics.median(full), conversation.shape[1]


def compiled_decode(model, ids: torch.Tensor, pixels: torch.Tensor, n: int, runs: int) -> tuple[float, float, float]:
    """Decode tok/s with the eager and the ``compile=True`` step (medians, alternating), and the seconds the
    first compiled call takes beyond an eager one (the compile)."""
    eager_first = time_ours(model, ids, pixels, n)[-1]
    compile_s = time_ours(model, ids, pixels, n, compile=True)[-1] - eager_first
    eager, compiled = [], []
    for _ in range(runs):
        eager.append(decode_rate(time_ours(model, ids, pixels, n)))
        compiled.append(decode_rate(time_ours(model, ids, pixels, n, compile=True)))
    return statistics.median(eager), statistics.median(compiled), compile_s


def bench(shape: Shape, hf, ours, try_compile: bool) -> dict:
    hf.to(shape.dtype)
    ids, pixels = make_inputs(shape, ours.config.num_image_tokens)
    # Warm up both and check that they agree before timing anything.
    a = generate(ours, ids, pixels, max_new_tokens=8, eos_token_id=[])
    with torch.inference_mode():
        b = hf.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, max_new_tokens=8, do_sample=False
        )[:, ids.shape[1] :]
    ttft: dict[str, list[float]] = {"ours": [], "hf": []}
    rate: dict[str, list[float]] = {"ours": [], "hf": []}
    for _ in range(shape.runs):
        ttft["ours"].append(time_ours(ours, ids, pixels, 1)[0])
        ttft["hf"].append(time_hf(hf, ids, pixels, 1)[0])
        rate["ours"].append(decode_rate(time_ours(ours, ids, pixels, shape.new_tokens)))
        rate["hf"].append(decode_rate(time_hf(hf, ids, pixels, shape.new_tokens)))
    step_bytes = decode_bytes(ours, ids.shape[1] + shape.new_tokens // 2)
    reuse, full, turn2_len = chat_turn(ours, ids, pixels, answer=32, follow_up=24, runs=shape.chat_runs)
    out = {
        "shape": shape.name,
        "prompt": ids.shape[1],
        "agree": a.tolist() == b.tolist(),
        "ttft": {k: statistics.median(v) for k, v in ttft.items()},
        "rate": {k: statistics.median(v) for k, v in rate.items()},
        "step_bytes": step_bytes,
        "turn2": (reuse, full, turn2_len),
    }
    if try_compile:
        out["compile"] = compiled_decode(ours, ids, pixels, shape.new_tokens, shape.runs)
    return out


def report_row(r: dict, bandwidth: float) -> str:
    t, d = r["ttft"], r["rate"]
    reuse, full, turn2_len = r["turn2"]
    gbs = {k: r["step_bytes"] * v / 1e9 for k, v in d.items()}
    return (
        f"| {r['shape']} | {r['prompt']} | {'yes' if r['agree'] else 'NO'} "
        f"| {1e3 * t['ours']:.1f} | {1e3 * t['hf']:.1f} | {t['hf'] / t['ours']:.2f}x "
        f"| {d['ours']:.1f} | {d['hf']:.1f} | {d['ours'] / d['hf']:.2f}x "
        f"| {gbs['ours']:.1f} / {gbs['hf']:.1f} of {bandwidth:.1f} "
        f"| {1e3 * reuse:.1f} | {1e3 * full:.1f} | {full / reuse:.1f}x ({turn2_len} tok) |"
    )


HEADER = (
    "| shape | prompt tok | same tokens | TTFT ms minillava | TTFT ms transformers | TTFT speedup "
    "| decode tok/s minillava | decode tok/s transformers | decode speedup | decode GB/s (ours / hf of copy bw) "
    "| turn-2 TTFT ms reuse | turn-2 TTFT ms recompute | turn-2 speedup |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--runs", type=int, help="timed runs per side and measurement (default: per shape)")
    parser.add_argument("--compile", action="store_true", help="also time a torch.compile'd decode step")
    parser.add_argument(
        "--llamacpp",
        type=int,
        nargs="?",
        const=5,
        metavar="ROUNDS",
        help="instead: the 7B decoder slice beside llama.cpp (F32, BF16, Q8_0, Q4_0), minillava (fp32, bf16, int8, "
        "int4) and transformers, ROUNDS alternating rounds (default 5); see benchmarks/llamacpp.py",
    )
    args = parser.parse_args(argv)
    if args.llamacpp:
        from llamacpp import run

        run(LLAMA_7B_2_LAYERS, TINY_VISION, 32000, args.threads, args.llamacpp, args.compile)
        return 0
    torch.set_num_threads(args.threads)
    bandwidth = memory_bandwidth()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}, "
        f"memory bandwidth (1 GiB copy, read + write) {bandwidth:.1f} GB/s, load average {os.getloadavg()[0]:.1f}"
    )
    rows, compiled = [], []
    shapes = [SHAPES[name] for name in args.shapes]
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        for arch in dict.fromkeys(s.arch for s in shapes):
            hf, converted = build_reference(next(s for s in shapes if s.arch == arch), Path(tmp))
            for shape in (s for s in shapes if s.arch == arch):
                if args.runs:
                    shape = replace(shape, runs=args.runs, chat_runs=max(1, args.runs // 2))
                ours = minillava.load(converted, dtype=shape.dtype)
                result = bench(shape, hf, ours, args.compile)
                rows.append(report_row(result, bandwidth))
                print(rows[-1], flush=True)
                if "compile" in result:
                    eager, comp, secs = result["compile"]
                    hf_rate = result["rate"]["hf"]
                    compiled.append(
                        f"| {shape.name} | {eager:.1f} | {comp:.1f} | {comp / eager:.2f}x | {comp / hf_rate:.2f}x "
                        f"| {secs:.0f} |"
                    )
                    print(compiled[-1], flush=True)
                del ours
                gc.collect()
            del hf
            gc.collect()
    print(f"\n(load average now {os.getloadavg()[0]:.1f})\n")
    print(HEADER)
    print("\n".join(rows))
    if compiled:
        print(
            "\n| shape | decode tok/s eager | decode tok/s compiled | compiled / eager | compiled / transformers "
            "| compile s |\n|---|---|---|---|---|---|"
        )
        print("\n".join(compiled))
    return 0


if __name__ == "__main__":
    sys.exit(main())
