"""Which shape does the bundled model look at? Lookup accuracy on held-out images with two or three shapes, split
by what the question asks and how it names the shape.

    .venv/bin/python benchmarks/eval_lookups.py                       # the README's three held-out sets
    .venv/bin/python benchmarks/eval_lookups.py --model DIR --sets 5:0 --images 100

Every shape of every image gets each question below that names it unambiguously, asked on its own (greedy,
exact match). A row near chance (41% here: a shape drawn at random among the two or three) means the
decoder cannot pick the shape by that kind of name; a row near the cell-named ones means it can.

=================== ==========================================
row                 question
=================== ==========================================
colour by cell      What color is the object at the top left?
kind by cell        What shape is the object at the top left?
colour by kind      What color is the star?
kind by colour      What shape is the red object?
cell by both        Where is the red star?
=================== ==========================================
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

import torch
from eval_demo import README_SETS, parse_set  # the script's folder is on sys.path

import minillava
from minillava.generate import generate
from minillava.processor import load_processor
from minillava.shapes.data import IMAGE_SIZE, POSITION_PHRASES, answers_match, render_scene, sample_rng, sample_scene
from minillava.shapes.recipe import ASSET_DIR

ROWS = ("colour by cell", "kind by cell", "colour by kind", "kind by colour", "cell by both")


def lookups(seed: int, start: int, n_images: int) -> list[tuple]:
    """``(image, question, answer, row)`` for images ``start .. start+n_images-1`` of held-out stream ``seed``."""
    items = []
    for index in range(start, start + n_images):
        rng = sample_rng(seed, "heldout", index)
        shapes = sample_scene(rng, IMAGE_SIZE)
        if len(shapes) < 2:
            continue
        image = render_scene(shapes, rng, IMAGE_SIZE)
        for s in shapes:
            where = POSITION_PHRASES[s.cell]
            items.append((image, f"What color is the object {where}?", s.color, "colour by cell"))
            items.append((image, f"What shape is the object {where}?", s.kind, "kind by cell"))
            if sum(t.kind == s.kind for t in shapes) == 1:
                items.append((image, f"What color is the {s.kind}?", s.color, "colour by kind"))
            if sum(t.color == s.color for t in shapes) == 1:
                items.append((image, f"What shape is the {s.color} object?", s.kind, "kind by colour"))
            items.append((image, f"Where is the {s.name}?", s.position, "cell by both"))
    return items


def score(model: minillava.Llava, processor, items: list[tuple], batch_size: int = 64) -> dict[str, tuple[int, int]]:
    """``{row: (correct, total)}``."""
    correct, total = Counter(), Counter()
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        prompts = [processor.format_chat([{"role": "user", "content": f"<image>\n{it[1]}"}]) for it in chunk]
        enc = processor(prompts, [[it[0]] for it in chunk], padding_side="left")
        with torch.no_grad():
            out = generate(model, enc["input_ids"], enc["pixel_values"], enc["attention_mask"], max_new_tokens=8)
        for (_, _, answer, row), ids in zip(chunk, out, strict=True):
            correct[row] += answers_match(processor.decode(ids, skip_special_tokens=True), answer)
            total[row] += 1
    return {row: (correct[row], total[row]) for row in ROWS if total[row]}


def main(argv: list[str] | None = None) -> int:
    """Print each set's accuracy per row, then the mean over the sets."""
    p = argparse.ArgumentParser(description="lookup accuracy by how the question names the shape")
    p.add_argument("--model", default=str(ASSET_DIR), help="checkpoint directory (default: the bundled model)")
    p.add_argument(
        "--sets", nargs="+", type=parse_set, default=[parse_set(s) for s in README_SETS], metavar="SEED:START"
    )
    p.add_argument("--images", type=int, default=400, help="held-out images per set (those with one shape are skipped)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = minillava.load(args.model).eval()
    processor = load_processor(args.model)
    per_set = []
    for seed, start in args.sets:
        scores = score(model, processor, lookups(seed, start, args.images))
        cells = "  ".join(f"{row} {100 * c / n:5.1f}% ({n})" for row, (c, n) in scores.items())
        print(f"stream {seed}, images {start}..{start + args.images - 1}:  {cells}")
        per_set.append(scores)
    mean = {row: sum(s[row][0] / s[row][1] for s in per_set) / len(per_set) for row in per_set[0]}
    print("mean:  " + "  ".join(f"{row} {100 * a:5.1f}%" for row, a in mean.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
