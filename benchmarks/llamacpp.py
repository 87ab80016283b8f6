"""llama.cpp beside minillava and transformers on the same random decoder: a GGUF writer, a llama-cpp-python timer
and the side-by-side table that ``bench_generate.py --llamacpp`` prints.

Optional: needs ``gguf`` and ``llama-cpp-python``, which compiles llama.cpp from source (about 15 minutes on two
cores; build the wheel once and install it from there)::

    CMAKE_BUILD_PARALLEL_LEVEL=2 pip wheel llama-cpp-python -w /work/wheels --no-deps
    pip install gguf /work/wheels/llama_cpp_python-*.whl

Every system decodes ``new_tokens`` greedy tokens after the same ``prompt``-token text prompt and prefills the same
``prefill``-token prompt, one round after another, each system loaded for its turn only (so at most one model is
in memory and machine noise hits all alike); medians over rounds. llama.cpp's last-token logits after the prompt
are compared with minillava fp32's (cosine, same top token), so every row is known to compute the same thing.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

GGUF_KINDS = ("F32", "BF16", "Q8_0", "Q4_0")
FILE_TYPES = {"F32": 0, "BF16": 32, "Q8_0": 7, "Q4_0": 2}  # gguf.LlamaFileType
# The embedding table is read one row per token, so its type does not change the speed; keeping it in BF16 (F32 in
# the F32 file) keeps llama.cpp's input the same as minillava's. The Q4_0 file keeps output.weight at Q8_0, as
# minillava's int4 keeps its lm_head at int8 (llama.cpp's own quantize tool would keep it at Q6_K).
EMBEDDING_TYPE = {"F32": "F32", "BF16": "BF16", "Q8_0": "BF16", "Q4_0": "BF16"}
OUTPUT_TYPE = {"F32": "F32", "BF16": "BF16", "Q8_0": "Q8_0", "Q4_0": "Q8_0"}


def missing() -> str | None:
    """Why the llama.cpp comparison cannot run here, or None when it can."""
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError as err:
        return f"{err.name} is not installed (pip install gguf llama-cpp-python; see benchmarks/llamacpp.py)"
    return None


def interleave_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows from the half-split RoPE layout (transformers, minillava) to llama.cpp's interleaved one: within
    each head, row ``i`` of the first half and row ``i`` of the second become rows ``2i`` and ``2i + 1``."""
    out, cols = weight.shape
    return weight.reshape(heads, 2, out // heads // 2, cols).transpose(1, 2).reshape(out, cols)


def gguf_tensors(llm) -> list[tuple[str, torch.Tensor, str]]:
    """``(GGUF name, fp32 tensor, role)`` for a minillava decoder, role being ``matrix``, ``norm``, ``embedding`` or
    ``output``."""
    c = llm.config
    out = [("token_embd.weight", llm.embed_tokens.weight, "embedding")]
    for i, block in enumerate(llm.layers):
        attn, mlp = block.self_attn, block.mlp
        out += [
            (f"blk.{i}.attn_norm.weight", block.input_layernorm.weight, "norm"),
            (f"blk.{i}.attn_q.weight", interleave_rope(attn.q_proj.weight, c.num_heads), "matrix"),
            (f"blk.{i}.attn_k.weight", interleave_rope(attn.k_proj.weight, c.num_kv_heads), "matrix"),
            (f"blk.{i}.attn_v.weight", attn.v_proj.weight, "matrix"),
            (f"blk.{i}.attn_output.weight", attn.o_proj.weight, "matrix"),
            (f"blk.{i}.ffn_norm.weight", block.post_attention_layernorm.weight, "norm"),
            (f"blk.{i}.ffn_gate.weight", mlp.gate_proj.weight, "matrix"),
            (f"blk.{i}.ffn_up.weight", mlp.up_proj.weight, "matrix"),
            (f"blk.{i}.ffn_down.weight", mlp.down_proj.weight, "matrix"),
        ]
    out.append(("output_norm.weight", llm.norm.weight, "norm"))
    out.append(("output.weight", (llm.lm_head or llm.embed_tokens).weight, "output"))
    return [(name, t.detach().float(), role) for name, t, role in out]


def write_gguf(llm, path: Path, kind: str) -> int:
    """Write a minillava decoder (fp32 weights, no biases) as a llama.cpp GGUF of ``kind``; returns the bytes one
    decode step reads (every tensor but the embedding table)."""
    import gguf

    c = llm.config
    if c.attention_bias or c.mlp_bias or c.rope_scaling:
        raise ValueError("the GGUF writer covers plain LLaMA decoders (no biases, default RoPE)")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_heads)
    writer.add_head_count_kv(c.num_kv_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(FILE_TYPES[kind])
    # A tokenizer is required even when only ids go in: the special pieces, the 256 byte pieces, then fillers.
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    tokens += [f"piece{i}" for i in range(c.vocab_size - len(tokens))]
    types += [gguf.TokenType.NORMAL] * (c.vocab_size - len(types))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * c.vocab_size)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    step_bytes = 0
    for name, tensor, role in gguf_tensors(llm):
        qtype = {"norm": "F32", "embedding": EMBEDDING_TYPE[kind], "output": OUTPUT_TYPE[kind]}.get(role, kind)
        data = tensor.numpy()
        if qtype != "F32":
            data = gguf.quants.quantize(data, gguf.GGMLQuantizationType[qtype])
        writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[qtype])
        if role != "embedding":
            step_bytes += data.nbytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return step_bytes


class LlamaCpp:
    """A GGUF loaded by llama-cpp-python, fed token ids: prefill, greedy decode, last logits."""

    def __init__(self, path: Path, threads: int, context: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(path),
            n_threads=threads,
            n_threads_batch=threads,
            n_ctx=context,
            n_batch=512,
            use_mmap=False,
            verbose=False,
        )

    def logits(self) -> torch.Tensor:
        import numpy as np
        from llama_cpp import llama_cpp

        pointer = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return torch.from_numpy(np.ctypeslib.as_array(pointer, shape=(self.llm.n_vocab(),)).copy())

    def run(self, ids: list[int], n: int) -> list[float]:
        """Feed ``ids`` from an empty cache, then ``n - 1`` greedy tokens; seconds from the call to each token."""
        self.llm.reset()
        stamps = []
        t0 = time.perf_counter()
        self.llm.eval(ids)
        for i in range(n):
            token = int(self.logits().argmax())
            stamps.append(time.perf_counter() - t0)
            if i + 1 < n:
                self.llm.eval([token])
        return stamps

    def close(self) -> None:
        self.llm.close()


@dataclass
class System:
    name: str  # as printed
    kind: str  # "llama.cpp", "minillava" or "transformers"
    source: Path
    dtype: torch.dtype | None = None
    compile: bool = False


def time_system(system: System, threads: int, prompt: list[int], prefill: list[int], n: int):
    """Load ``system``, warm it up, time one decode run and one prefill; return (decode stamps, prefill seconds,
    last-token logits after ``prompt``)."""
    if system.kind == "llama.cpp":
        runner = LlamaCpp(system.source, threads, context=len(prefill) + n + 8)
        try:
            runner.run(prompt, 4)  # warm-up
            runner.run(prompt, 1)
            logits = runner.logits()  # after the prompt, as the others
            return runner.run(prompt, n), runner.run(prefill, 1)[0], logits
        finally:
            runner.close()
    from timers import time_hf, time_ours  # the same timers as bench_generate.py's

    ids, long_ids = torch.tensor([prompt]), torch.tensor([prefill])
    if system.kind == "minillava":
        import minillava

        model = minillava.load(system.source, dtype=system.dtype)
        with torch.inference_mode():
            logits = model(ids, logits_to_keep=1).logits[0, -1].float()
        time_ours(model, ids, None, 4, system.compile)  # warm-up (compiles the step when asked to)
        return time_ours(model, ids, None, n, system.compile), time_ours(model, long_ids, None, 1)[0], logits
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(system.source, dtype=system.dtype).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    with torch.inference_mode():
        logits = hf(input_ids=ids).logits[0, -1].float()
    time_hf(hf, ids, None, 4)
    return time_hf(hf, ids, None, n), time_hf(hf, long_ids, None, 1)[0], logits


def side_by_side(
    systems: list[System],
    step_bytes: dict[str, int],
    threads: int,
    rounds: int,
    vocab: int,
    reference: str = "minillava fp32",
    prompt_len: int = 64,
    new_tokens: int = 64,
    prefill_len: int = 512,
) -> str:
    """Alternating rounds over ``systems``; returns the markdown table: decode tok/s, GB/s of weights read, prefill
    tok/s, and each system's last-token logits after the prompt against ``reference``'s."""
    gen = torch.Generator().manual_seed(0)
    prompt = [1] + torch.randint(3, vocab, (prompt_len - 1,), generator=gen).tolist()
    prefill = [1] + torch.randint(3, vocab, (prefill_len - 1,), generator=gen).tolist()
    decode: dict[str, list[float]] = {s.name: [] for s in systems}
    fill: dict[str, list[float]] = {s.name: [] for s in systems}
    logits: dict[str, torch.Tensor] = {}
    loads = []
    for r in range(rounds):
        for s in systems:
            stamps, seconds, last = time_system(s, threads, prompt, prefill, new_tokens)
            decode[s.name].append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
            fill[s.name].append(prefill_len / seconds)
            logits.setdefault(s.name, last)
            print(
                f"  {s.name}: decode {decode[s.name][-1]:.1f} tok/s, prefill {fill[s.name][-1]:.0f} tok/s", flush=True
            )
            gc.collect()
        loads.append(os.getloadavg()[0])
        print(f"round {r + 1}/{rounds} done, load average {loads[-1]:.1f}", flush=True)
    want = logits[reference]
    rows = [
        f"{threads} threads, {rounds} alternating rounds, {new_tokens} greedy tokens after a {prompt_len}-token "
        f"prompt, a {prefill_len}-token prefill; load average {min(loads):.1f}..{max(loads):.1f}",
        "",
        f"| system | weights | decode tok/s | GB/s of weights | {prefill_len}-token prefill tok/s "
        f"| logits vs {reference} (cosine, same top) |",
        "|---|---|---|---|---|---|",
    ]
    for s in systems:
        rate, pre = statistics.median(decode[s.name]), statistics.median(fill[s.name])
        cos = torch.nn.functional.cosine_similarity(logits[s.name], want, dim=0).item()
        top = "yes" if int(logits[s.name].argmax()) == int(want.argmax()) else "no"
        system, weights = s.name.split(" ", 1)
        rows.append(
            f"| {system} | {weights} | {rate:.1f} | {rate * step_bytes[s.name] / 1e9:.1f} | {pre:.0f} "
            f"| {cos:.4f}, {top} |"
        )
    return "\n".join(rows)


def prepare(workdir: Path, text: dict, vision: dict, image_token_id: int) -> tuple[list[System], dict[str, int]]:
    """Build a random transformers LLaVA of these shapes (N(0, 0.02) weights, norms 1), save it, convert it to
    minillava fp32, bf16, int8 and int4 (bf16 activations) and write the four GGUFs; return the systems in table
    order and the bytes a decode step reads for each."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    import minillava
    from weights_convert.__main__ import main as convert_main

    config = LlavaConfig(
        text_config=LlamaConfig(**text, rms_norm_eps=1e-5, max_position_embeddings=4096, pad_token_id=0),
        vision_config=CLIPVisionConfig(**vision, projection_dim=64),
        image_token_index=image_token_id,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(workdir / "hf")
    converted = {"fp32": [], "bf16": ["--dtype", "bfloat16"]}
    converted |= {q: ["--dtype", "bfloat16", "--quantize", q] for q in ("int8", "int4")}
    for name, options in converted.items():
        if convert_main([str(workdir / "hf"), str(workdir / name), *options]) != 0:
            raise SystemExit(f"converting the {name} checkpoint failed")
    reference = minillava.load(workdir / "fp32")
    systems, step_bytes = [], {}
    for kind in GGUF_KINDS:
        name = f"llama.cpp {kind}"
        step_bytes[name] = write_gguf(reference.llm, workdir / f"{kind}.gguf", kind)
        systems.append(System(name, "llama.cpp", workdir / f"{kind}.gguf"))
    del reference
    for name in converted:
        llm = minillava.load(workdir / name).llm
        weights = sum(p.numel() * p.element_size() for n, p in llm.named_parameters() if not n.startswith("embed"))
        step_bytes[f"minillava {name}"] = weights + llm.embed_tokens.weight[0].nbytes
        systems.append(System(f"minillava {name}", "minillava", workdir / name))
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        step_bytes[f"transformers {label}"] = step_bytes[f"minillava {label}"]
        systems.append(System(f"transformers {label}", "transformers", workdir / "hf", dtype))
    return systems, step_bytes


def run(text: dict, vision: dict, image_token_id: int, threads: int, rounds: int, compile: bool = False) -> None:
    """Print the side-by-side table for a decoder of ``text`` shapes (``vision``: a tower that stays idle); with
    ``compile``, minillava's rows come twice, eager and through the compiled decode step."""
    import tempfile

    reason = missing()
    if reason:
        print(f"llama.cpp comparison skipped: {reason}")
        return
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="bench-llamacpp-") as tmp:
        systems, step_bytes = prepare(Path(tmp), text, vision, image_token_id)
        if compile:
            for s in [s for s in systems if s.kind == "minillava"]:
                systems.append(System(f"{s.name} compiled", s.kind, s.source, s.dtype, compile=True))
                step_bytes[systems[-1].name] = step_bytes[s.name]
        print(side_by_side(systems, step_bytes, threads, rounds, vocab=min(text["vocab_size"], image_token_id)))
