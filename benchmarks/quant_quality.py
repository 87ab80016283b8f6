"""What int8 and int4 weights cost in accuracy, on a random LLaMA-7B-shaped decoder slice with sharpened weights.

    .venv/bin/python benchmarks/quant_quality.py [--layers 2] [--tokens 64]

The slice (hidden 4096, ffn 11008, vocabulary 32064) is drawn with a larger spread than a fresh initialisation
(weights N(0, 4 / fan_in), norms 1 + N(0, 0.2^2)), so that logits are far from uniform, saved in fp32 and loaded
four ways: fp32 (the reference), bf16, and int8 / int4 quantised while loading (bf16 activations). Printed:

- per matrix product: ``|y_q - y| / |y|`` of each decoder linear layer on the activations the fp32 model feeds it
  (bf16 inputs for the quantised and bf16 layers), mean and worst over the layers of each kind;
- final logits over a random prompt: cosine to fp32 (mean over positions), the largest difference relative to the
  largest logit, and how often the top token agrees.

Gaussian weights are the benign case for quantisation (trained weights have outliers); the bundled model's
held-out accuracy (``eval_demo.py --quantize``) is the check on trained weights.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import minillava  # noqa: E402
from minillava import quant  # noqa: E402
from minillava.config import LlavaConfig, TextConfig, VisionConfig  # noqa: E402


def random_slice(layers: int, sharpened: bool, seed: int = 0) -> minillava.Llava:
    """``layers`` LLaMA-7B blocks with LLaVA-1.5's vocabulary and a tiny idle vision tower. Weights N(0, 0.02)
    and norms 1 (a fresh initialisation), or ``sharpened``: N(0, 4 / fan_in) and norms 1 + N(0, 0.2^2)."""
    text = TextConfig(
        vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_layers=layers, num_heads=32, rms_norm_eps=1e-5
    )
    vision = VisionConfig(
        hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2, image_size=28, patch_size=14
    )
    model = minillava.Llava(LlavaConfig(vision=vision, text=text, image_token_id=32000))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1 + 0.2 * noise if sharpened else torch.ones_like(p))
            else:
                p.copy_(noise * (2 / p.shape[-1] ** 0.5 if sharpened else 0.02))
    return model.eval()


def linear_inputs(model: minillava.Llava, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input of every decoder linear layer during the fp32 forward of ``ids``."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name in quant.quantized_linear_names(model):
        hook = model.get_submodule(name).register_forward_pre_hook(
            lambda m, args, name=name: seen.update({name: args[0]})
        )
        hooks.append(hook)
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return seen


def kind_of(name: str) -> str:
    return name.rsplit(".", 1)[-1].removesuffix("_proj")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ids = torch.randint(3, 32000, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory(prefix="quant-quality-") as tmp:
        minillava.save(random_slice(args.layers, sharpened=True), Path(tmp) / "fp32")
        reference = minillava.load(Path(tmp) / "fp32")
        inputs = linear_inputs(reference, ids)
        with torch.no_grad():
            want = reference(ids).logits[0].float()
        rows = []
        for label, options in (
            ("bf16", {"dtype": torch.bfloat16}),
            ("int8", {"dtype": torch.bfloat16, "quantize": "int8"}),
            ("int4", {"dtype": torch.bfloat16, "quantize": "int4"}),
        ):
            model = minillava.load(Path(tmp) / "fp32", **options)
            errors: dict[str, list[float]] = {}
            with torch.no_grad():
                for name, x in inputs.items():
                    y = F.linear(x, reference.get_submodule(name).weight)
                    got = model.get_submodule(name)(x.bfloat16()).float()
                    errors.setdefault(kind_of(name), []).append(float((got - y).norm() / y.norm()))
                logits = model(ids).logits[0].float()
            cos = F.cosine_similarity(logits, want, dim=-1)
            diff = float((logits - want).abs().max() / want.abs().max())
            top = float((logits.argmax(-1) == want.argmax(-1)).float().mean())
            per_kind = ", ".join(f"{k} {statistics.mean(v):.4f}/{max(v):.4f}" for k, v in errors.items())
            rows.append(
                f"| {label} | {per_kind} | {float(cos.mean()):.5f} (min {float(cos.min()):.5f}) "
                f"| {diff:.4f} | {100 * top:.1f}% |"
            )
            del model
    print(f"random sharpened slice: {args.layers} LLaMA-7B blocks, vocabulary 32064, {args.tokens} prompt tokens\n")
    print(
        "| weights | per-matmul relative error, mean/worst by layer | logits cosine to fp32 "
        "| max logit diff / max logit | same top token |"
    )
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
