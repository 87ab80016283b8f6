"""Where does the bundled model look when it answers a colour question? Attention of the position that predicts
the answer, per decoder layer and head, on the image token of the shape asked about and on each other shape's.

    .venv/bin/python benchmarks/lookup_attention.py                  # the README's three held-out sets
    .venv/bin/python benchmarks/lookup_attention.py --model DIR --sets 5:0 --images 100

Every shape of every held-out image with two or three shapes is asked "What color is the object at the top
left?" (named by its cell) and, where its kind is unique in the image, "What color is the star?" (named by its
kind), each on its own. Each cell of the printed tables is ``named / other / image``: the mean attention on the
named shape's token, on one other shape's token, and on all image tokens together. A head that picks the shape
puts much more on ``named`` than on ``other``; one that spreads evenly over the shapes does not tell them apart.
"""

from __future__ import annotations

import argparse
import sys

import torch
from eval_demo import add_set_arguments  # the script's folder is on sys.path
from eval_lookups import multi_shape_scenes

import minillava
from minillava.processor import load_processor
from minillava.shapes.data import POSITION_PHRASES

NAMINGS = ("cell", "kind")


def questions(seed: int, start: int, n_images: int) -> list[tuple[str, object, str, int, list[int]]]:
    """``(naming, image, question, named cell, other shapes' cells)`` for the images with two or three shapes."""
    out = []
    for _, shapes, image in multi_shape_scenes(seed, start, n_images):
        for s in shapes:
            others = [t.cell for t in shapes if t is not s]
            out.append(("cell", image, f"What color is the object {POSITION_PHRASES[s.cell]}?", s.cell, others))
            if sum(t.kind == s.kind for t in shapes) == 1:
                out.append(("kind", image, f"What color is the {s.kind}?", s.cell, others))
    return out


def attention_shares(model: minillava.Llava, processor, items: list, batch_size: int) -> dict[str, torch.Tensor]:
    """Per naming, ``[layers, heads, 3]``: mean attention on the named shape, on one other shape, on the image."""
    sums = {n: torch.zeros(model.config.text.num_layers, model.config.text.num_heads, 3) for n in NAMINGS}
    counts = dict.fromkeys(NAMINGS, 0)
    image_token = model.config.image_token_id
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        prompts = [processor.format_chat([{"role": "user", "content": f"<image>\n{q[2]}"}]) for q in chunk]
        enc = processor(prompts, [[q[1]] for q in chunk], padding_side="left")
        with torch.no_grad():
            out = model(enc["input_ids"], enc["pixel_values"], enc["attention_mask"], output_attentions=True)
        # [B, layers, heads, S]: what the last prompt position (the one predicting the answer) attends to.
        last = torch.stack([a[:, :, -1] for a in out.attentions], dim=1).float()
        for row, (naming, _, _, cell, others) in enumerate(chunk):
            first = int((enc["input_ids"][row] == image_token).nonzero()[0])
            probs = last[row]
            named = probs[..., first + cell]
            other = probs[..., [first + c for c in others]].mean(-1)
            image = probs[..., first : first + model.config.num_image_tokens].sum(-1)
            sums[naming] += torch.stack([named, other, image], dim=-1)
            counts[naming] += 1
    return {n: sums[n] / counts[n] for n in NAMINGS}


def format_shares(naming: str, shares: torch.Tensor) -> str:
    heads = shares.shape[1]
    lines = [
        f"named by {naming}: named / other / image, per head",
        "layer  " + "  ".join(f"{h:^14}" for h in range(heads)),
    ]
    for layer, per_head in enumerate(shares):
        lines.append(f"{layer:<5}  " + "  ".join(f"{n:.2f}/{o:.2f}/{a:.2f}" for n, o, a in per_head.tolist()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="attention on the named shape when the model answers a colour question")
    add_set_arguments(p, images_help="held-out images per set (those with one shape are skipped)")
    p.set_defaults(batch_size=32)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = minillava.load(args.model).eval()
    processor = load_processor(args.model)
    items = [q for seed, start in args.sets for q in questions(seed, start, args.images)]
    for naming, shares in attention_shares(model, processor, items, args.batch_size).items():
        print(format_shares(naming, shares), end="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
