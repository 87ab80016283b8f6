"""Peak memory of converting and loading a LLaVA-1.5-7B- or 1.6-Mistral-7B-shaped checkpoint slice, next to
transformers.

The slice has the real tensor shapes where it matters for memory: the CLIP-L/336 tower (303M parameters), the
7B projector, embedding and head (vocabulary 32064) and two LLaMA-7B decoder layers, in fp16, sharded at 500 MB
(about 2 GB in all). It is written twice: as llava-hf (safetensors) and as original LLaVA (``.bin`` pickle
shards plus a CLIP directory). With ``--llava 1.6`` the decoder layers are Mistral-7B's (8 key-value heads, MLP
14336), the model has the image newline and anyres settings, and the original layout is LLaVA-1.6's:
``llava_mistral`` safetensors shards with the tuned tower inside, no CLIP directory. Every measurement runs in a
fresh process and reports the peak resident set (``VmHWM``, which counts memory-mapped file pages that were
touched) above the process's RSS after its imports, as a multiple of the checkpoint's bytes.

    .venv/bin/python benchmarks/bench_memory.py               # builds under .bench/memory, measures, deletes
    .venv/bin/python benchmarks/bench_memory.py --llava 1.6   # the LLaVA-1.6 slice, under .bench/memory-1.6
    .venv/bin/python benchmarks/bench_memory.py --keep        # keep the checkpoints for another run

Targets: converting <= 0.75x the checkpoint's bytes; loading (then touching every weight) <= 1.1x; quantising
while loading <= 1.15x the quantised model's bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARD_BYTES = 500 * 10**6


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


# --- building the slice -----------------------------------------------------------------------------------------


# LLaVA-1.6's released pinpoints, (height, width) as transformers reads them.
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def slice_config(llava: str = "1.5"):
    from minillava.config import AnyresConfig, ImageConfig, LlavaConfig, TextConfig, VisionConfig

    if llava == "1.6":
        text = TextConfig(
            vocab_size=32064, hidden_size=4096, intermediate_size=14336, num_layers=2, num_heads=32,
            num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=32768, pad_token_id=32001,
            model_type="mistral",
        )  # fmt: skip
        anyres = AnyresConfig(grid_pinpoints=PINPOINTS)
        return LlavaConfig(VisionConfig(), text, 32000, image=ImageConfig(mode="anyres"), anyres=anyres)
    text = TextConfig(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=2,
        num_heads=32,
        rms_norm_eps=1e-5,
        pad_token_id=32001,
    )
    return LlavaConfig(vision=VisionConfig(), text=text, image_token_id=32000)


def random_tensors(config, seed: int = 0):
    """``(minillava name, fp16 tensor)`` for every weight, drawn one at a time."""
    import torch

    from minillava.layouts.source import build_empty

    gen = torch.Generator().manual_seed(seed)
    for name, meta in build_empty(config).state_dict().items():
        yield name, (torch.randn(meta.shape, generator=gen) * 0.02).half()


def write_shards(tensors, directory: Path, kind: str) -> int:
    """Write ``(name, tensor)`` pairs as 500 MB shards (``safetensors`` or ``bin``) with an index; return bytes."""
    import torch
    from safetensors.torch import save_file

    shards, pending, size, total = [], {}, 0, 0

    def flush():
        nonlocal pending, size
        if pending:
            shards.append(pending)
            name = f"shard-{len(shards)}.tmp"
            if kind == "safetensors":
                save_file(pending, directory / name, metadata={"format": "pt"})
            else:
                torch.save(pending, directory / name)
            shards[-1] = list(pending)
            pending, size = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if pending and size + nbytes > SHARD_BYTES:
            flush()
        pending[name], size, total = tensor, size + nbytes, total + nbytes
    flush()
    base, ext = ("model", "safetensors") if kind == "safetensors" else ("pytorch_model", "bin")
    weight_map = {}
    for i, names in enumerate(shards):
        final = f"{base}-{i + 1:05d}-of-{len(shards):05d}.{ext}"
        os.replace(directory / f"shard-{i + 1}.tmp", directory / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / f"{base}.{ext}.index.json").write_text(json.dumps(index))
    return total


def build(work: Path, llava: str) -> dict[str, int]:
    """Write the llava-hf and the original-layout slices; return their sizes in bytes."""
    import torch

    from minillava.layouts.keymaps import HF_V4, original_keymap
    from weights_convert.to_hf import clip_vision_dict, hf_config_dict, preprocessor_dict

    config = slice_config(llava)
    hf = work / "llava-hf"
    hf.mkdir(parents=True)
    sizes = {"hf": write_shards(((HF_V4.to_theirs(k), t) for k, t in random_tensors(config)), hf, "safetensors")}
    (hf / "config.json").write_text(json.dumps(hf_config_dict(config, 32064, torch.float16)))
    (hf / "preprocessor_config.json").write_text(json.dumps(preprocessor_dict(config)))

    if llava == "1.6":
        sizes["original"] = build_original_next(work, config)
        return sizes
    # Original LLaVA: vocabulary 32000, decoder + projector in .bin shards, the tower in a CLIP directory.
    original, clip = work / "llava-v1.5-7b-slice", work / "clip-vit-large-patch14-336"
    original.mkdir()
    clip.mkdir()
    keymap = original_keymap("mlp2x_gelu", 2)

    def llava_part():
        for name, tensor in random_tensors(config, seed=1):
            if name.startswith("vision."):
                continue
            if "embed_tokens" in name or "lm_head" in name:
                tensor = tensor[:32000].clone()  # a view would save the whole storage
            yield keymap.to_theirs(name), tensor

    sizes["original"] = write_shards(llava_part(), original, "bin")
    tower = {"vision_model." + k[len("vision.") :]: t for k, t in random_tensors(config, 2) if k.startswith("vision.")}
    torch.save(tower, clip / "pytorch_model.bin")
    sizes["original"] += sum(t.numel() * t.element_size() for t in tower.values())
    clip_config = {"model_type": "clip", "projection_dim": 768, "vision_config": clip_vision_dict(config.vision)}
    (clip / "config.json").write_text(json.dumps(clip_config))
    hf_cfg = json.loads((hf / "config.json").read_text())["text_config"]
    flat = {k: hf_cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")}
    original_config = {
        "model_type": "llava",
        **flat,
        "vocab_size": 32000,
        "num_key_value_heads": 32,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
        "mm_hidden_size": 1024,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False,
    }
    (original / "config.json").write_text(json.dumps(original_config))
    return sizes


def build_original_next(work: Path, config) -> int:
    """Original LLaVA-1.6 (liuhaotian/llava-v1.6-mistral-7b): vocabulary 32000, safetensors shards holding the
    decoder, projector, image newline and the tuned tower; returns its bytes."""
    from minillava.layouts.keymaps import original_keymap

    original = work / "llava-v1.6-mistral-7b-slice"
    original.mkdir()
    keymap = original_keymap("mlp2x_gelu", 2)

    def tensors():
        for name, tensor in random_tensors(config, seed=1):
            if "embed_tokens" in name or "lm_head" in name:
                tensor = tensor[:32000].clone()
            yield keymap.to_theirs(name), tensor

    total = write_shards(tensors(), original, "safetensors")
    t = config.text
    (original / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llava_mistral",
                "vocab_size": 32000,
                "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_layers,
                "num_attention_heads": t.num_heads,
                "num_key_value_heads": t.num_kv_heads,
                "rms_norm_eps": 1e-5,
                "rope_theta": 1e6,
                "sliding_window": None,
                "max_position_embeddings": 32768,
                "image_aspect_ratio": "anyres",
                "image_grid_pinpoints": PINPOINTS,  # the same list, read as (width, height) by the original
                "mm_patch_merge_type": "spatial_unpad",
                "mm_hidden_size": 1024,
                "mm_projector_type": "mlp2x_gelu",
                "mm_vision_select_layer": -2,
                "mm_vision_select_feature": "patch",
                "mm_vision_tower": "openai/clip-vit-large-patch14-336",
                "mm_use_im_start_end": False,
                "tokenizer_model_max_length": 4096,
            }
        )
    )
    return total


# --- measuring (each in a fresh process) --------------------------------------------------------------------------


def touch(model) -> None:
    """Read every byte of every weight with a reduction that allocates nothing large: a floating sum stays in the
    weight's dtype, but an integer sum promotes to int64 (a copy 8x an int8 weight's size), so integers take max."""
    import torch

    with torch.no_grad():
        for p in model.state_dict().values():
            p.sum() if p.is_floating_point() else p.max()


def measure(kind: str, work: Path, llava: str) -> None:
    """Run one measurement in this (fresh) process and print a JSON line."""
    import torch  # noqa: F401  (part of every baseline)

    import minillava
    from minillava.layouts import detect
    from weights_convert.convert import convert
    from weights_convert.to_hf import export_hf

    if kind == "transformers":
        from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

        reference = LlavaNextForConditionalGeneration if llava == "1.6" else LlavaForConditionalGeneration
    if llava == "1.6":  # the tower is inside the original checkpoint
        original, clip = work / "llava-v1.6-mistral-7b-slice", None
    else:
        original, clip = work / "llava-v1.5-7b-slice", work / "clip-vit-large-patch14-336"
    baseline = status_kib("VmRSS")
    start = time.perf_counter()
    if kind == "convert-hf":
        convert(detect(work / "llava-hf"), work / "out-hf")
    elif kind == "convert-original":
        convert(detect(original, clip), work / "out-original")
    elif kind == "export-hf":
        export_hf(work / "out-hf", work / "exported")
    elif kind == "load-converted":
        touch(minillava.load(work / "out-hf"))
    elif kind == "load-direct-hf":
        touch(minillava.load(work / "llava-hf"))
    elif kind == "load-direct-original":
        touch(minillava.load(original, vision_tower=clip))
    elif kind == "transformers":
        touch(reference.from_pretrained(work / "llava-hf", dtype=torch.float16))
    elif kind.startswith("load-quantize-"):
        model = minillava.load(work / "out-hf", dtype=torch.bfloat16, quantize=kind.removeprefix("load-quantize-"))
        touch(model)
        model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    else:
        raise ValueError(kind)
    seconds = time.perf_counter() - start
    peak = status_kib("VmHWM")
    result = {"kind": kind, "baseline_kib": baseline, "peak_kib": peak, "seconds": seconds}
    if kind.startswith("load-quantize-"):
        result["model_bytes"] = model_bytes
    print(json.dumps(result))


ROWS = (
    ("convert-hf", "hf", "python -m weights_convert llava-hf out", 0.75),
    ("convert-original", "original", "python -m weights_convert original out --vision-tower clip (.bin)", 0.75),
    ("export-hf", "hf", "python -m weights_convert --to hf out exported", 0.75),
    ("load-converted", "hf", "minillava.load(converted) + touch", 1.1),
    ("load-direct-hf", "hf", "minillava.load(llava-hf dir) + touch", 1.1),
    ("load-direct-original", "original", "minillava.load(original dir, vision_tower=) + touch", 1.1),
    ("transformers", "hf", "LlavaForConditionalGeneration.from_pretrained + touch", None),
    # Quantising while loading: peak against the bytes the quantised model holds (bf16 tower, embedding, scales).
    ("load-quantize-int8", "model", "minillava.load(converted, bf16, quantize='int8') + touch (x model)", 1.15),
    ("load-quantize-int4", "model", "minillava.load(converted, bf16, quantize='int4') + touch (x model)", 1.15),
)
LABELS_1_6 = {
    "convert-original": "python -m weights_convert original out (safetensors, tower inside)",
    "load-direct-original": "minillava.load(original dir) + touch",
    "transformers": "LlavaNextForConditionalGeneration.from_pretrained + touch",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llava", choices=("1.5", "1.6"), default="1.5", help="the slice's model (default 1.5)")
    parser.add_argument("--work", type=Path, help="scratch directory (default .bench/memory[-1.6])")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.work is None:
        args.work = ROOT / ".bench" / ("memory" if args.llava == "1.5" else "memory-1.6")
    if args.measure:
        measure(args.measure, args.work, args.llava)
        return 0
    sizes_path = args.work / "sizes.json"
    if not sizes_path.is_file():
        shutil.rmtree(args.work, ignore_errors=True)
        print(f"building the slice under {args.work} ...", flush=True)
        sizes_path.parent.mkdir(parents=True, exist_ok=True)
        sizes = build(args.work, args.llava)
        sizes_path.write_text(json.dumps(sizes))
    sizes = json.loads(sizes_path.read_text())
    for out in ("out-hf", "out-original", "exported"):
        shutil.rmtree(args.work / out, ignore_errors=True)
    print(f"checkpoint bytes: llava-hf {sizes['hf'] / 1e9:.3f} GB, original {sizes['original'] / 1e9:.3f} GB\n")
    print(f"| {'measurement':<66} | imports RSS | peak above imports | x checkpoint | target | time |")
    print(f"|{'-' * 68}|------------:|-------------------:|-------------:|-------:|-----:|")
    failed = False
    for kind, size_key, label, target in ROWS:
        if args.llava == "1.6":
            label = LABELS_1_6.get(kind, label)
        result = subprocess.run(
            [sys.executable, __file__, "--work", str(args.work), "--llava", args.llava, "--measure", kind],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if result.returncode:
            print(result.stderr, file=sys.stderr)
            return 1
        data = json.loads(result.stdout.strip().splitlines()[-1])
        delta = (data["peak_kib"] - data["baseline_kib"]) * 1024
        ratio = delta / (data["model_bytes"] if size_key == "model" else sizes[size_key])
        ok = "" if target is None else (f"<= {target}" if ratio <= target else f"FAIL > {target}")
        failed |= target is not None and ratio > target
        base = data["baseline_kib"] * 1024 / 1e9
        print(
            f"| {label:<66} | {base:8.2f} GB | {delta / 1e9:15.2f} GB | {ratio:11.2f}x | {ok:>6} "
            f"| {data['seconds']:3.0f}s |"
        )
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
