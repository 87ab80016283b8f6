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
from collections.abc import Iterator

import torch
from eval_demo import add_set_arguments, report_sets  # the script's folder is on sys.path
from PIL import Image

import minillava
from minillava.processor import load_processor
from minillava.shapes.data import (
    IMAGE_SIZE,
    EvalQuestion,
    Shape,
    _refs,
    image_id,
    render_scene,
    sample_rng,
    sample_scene,
)
from minillava.shapes.recipe import score_questions

ROWS = ("colour by cell", "kind by cell", "colour by kind", "kind by colour", "cell by both")


def multi_shape_scenes(seed: int, start: int, n_images: int) -> Iterator[tuple[int, list[Shape], Image.Image]]:
    """``(index, shapes, image)`` for the images ``start .. start+n_images-1`` of held-out stream ``seed`` that
    have two or three shapes."""
    for index in range(start, start + n_images):
        rng = sample_rng(seed, "heldout", index)
        shapes = sample_scene(rng, IMAGE_SIZE)
        if len(shapes) >= 2:
            yield index, shapes, render_scene(shapes, rng, IMAGE_SIZE)


def lookups(seed: int, start: int, n_images: int) -> list[EvalQuestion]:
    """The questions of :func:`multi_shape_scenes`, each with its row of :data:`ROWS` as ``qtype``. A shape is
    named as the training questions name it."""
    questions = []
    for index, shapes, image in multi_shape_scenes(seed, start, n_images):
        ident = image_id("heldout", index)
        for s in shapes:
            for ref in _refs(s, shapes, "color"):
                row = "colour by cell" if ref.startswith("the object ") else "colour by kind"
                questions.append(EvalQuestion(image, f"What color is {ref}?", s.color, row, ident))
            for ref in _refs(s, shapes, "kind"):
                row = "kind by cell" if ref.startswith("the object ") else "kind by colour"
                questions.append(EvalQuestion(image, f"What shape is {ref}?", s.kind, row, ident))
            questions.append(EvalQuestion(image, f"Where is the {s.name}?", s.position, "cell by both", ident))
    return questions


def main(argv: list[str] | None = None) -> int:
    """Print each set's table, then the mean and the worst set per row."""
    p = argparse.ArgumentParser(description="lookup accuracy by how the question names the shape")
    add_set_arguments(p, images_help="held-out images per set (those with one shape are skipped)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = minillava.load(args.model)
    processor = load_processor(args.model)
    report_sets(
        args.sets,
        args.images,
        lambda seed, start: score_questions(model, processor, lookups(seed, start, args.images), ROWS, args.batch_size),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
