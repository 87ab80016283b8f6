"""A synthetic visual question-answering set: coloured shapes on light backgrounds.

Every image is a 3x3 grid of cells with one to three shapes, each in its own cell, so shapes never
overlap and every shape has one unambiguous position name. Each shape has a kind, a colour from a
small palette of well-separated hues (jittered a little per image) and a size band ("big" or
"small", well apart). "Which is bigger" is asked only about a big and a small shape whose drawn
areas also differ by half or more (a big star covers less than a small square). Backgrounds are light and
unsaturated, plain or with mild noise, so they are never mistaken for a shape colour.

Questions come from a few fixed phrasings per type and have short canonical answers, so exact match
is a meaningful score:

========== ============================================ ==============================
qtype      example question                             answer
========== ============================================ ==============================
shape      What shape is the red object?                ``circle``
color      What color is the object on the left?        ``blue``
count      How many shapes are there?                   ``2``
position   Where is the red circle?                     ``top left``
bigger     Which is bigger, the red circle or the ...?  ``the red circle``
describe   Describe the image briefly.                  ``A big red circle at the top left.``
========== ============================================ ==============================

Determinism: everything is drawn from one ``random.Random`` per image, seeded with the string
``"minillava-shapes/{seed}/{split}/{index}"``. A string seed is hashed with SHA-512 by CPython, so
the stream is independent of ``PYTHONHASHSEED`` and of every other image's stream; the split name is
part of the seed, so train and held-out images come from disjoint streams, and per-shape colour
jitter and background noise make two streams drawing the same pixels vanishingly unlikely (the tests
check it). No global random state (``random``'s module functions, numpy) is touched.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageChops, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross")

# Hues far apart in RGB; per-image jitter (COLOR_JITTER) keeps them far apart from each other and
# from every background (all backgrounds are light grey-ish, shapes are saturated or black).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (235, 205, 20),
    "green": (40, 160, 60),
    "blue": (35, 75, 215),
    "purple": (135, 55, 185),
    "black": (25, 25, 25),
}
COLOR_JITTER = 12

# Cell index r*3+c -> position answer; and the phrase a caption uses for it.
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
POSITION_PHRASES = (
    "at the top left",
    "at the top",
    "at the top right",
    "on the left",
    "in the center",
    "on the right",
    "at the bottom left",
    "at the bottom",
    "at the bottom right",
)

SIZES = ("small", "big")
# Side lengths as fractions of the image side; 11-13 px and 17-19 px at 64 px. The bands are far
# apart (area ratio >= 1.7) so "bigger" is obvious even between a big triangle and a small square.
SMALL_SIDE = (0.17, 0.20)
BIG_SIDE_MIN = 0.27

# A big star (side 17) covers fewer pixels than a small square (side 13), so "which is bigger" is
# asked only where the drawn areas differ this much as well as the size bands.
BIGGER_MIN_AREA_RATIO = 1.5

PLAIN_BACKGROUNDS = ((255, 255, 255), (238, 238, 238), (245, 240, 226), (226, 234, 242))
NOISY_BACKGROUNDS = ((236, 236, 236), (226, 226, 226), (238, 232, 218), (222, 230, 238))
NOISE_AMPLITUDE = 10

QTYPES = ("shape", "color", "count", "position", "bigger", "describe")

# 72 px = a 3x3 grid of 24-px cells: with 24-px patches every shape lies inside one image token.
IMAGE_SIZE = 72
MAX_SHAPES = 3
# Training conversations ask up to this many different facts about one image (every fact of a one-shape
# image): more supervised answers per image than one or two turns, for the same image and prompt tokens.
TRAIN_TURNS = 8

DESCRIBE_PROMPTS = ("Describe the image briefly.", "Give a short description of the image.", "What is in the image?")
# Stage-1 (projector alignment) prompt; the ``plain`` template replaces the human turn by <image>.
CAPTION_PROMPT = "Describe the image briefly."

_SEED_PREFIX = "minillava-shapes"
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Shape:
    """One drawn shape: what it is and where its bounding box lies (pixels, ``x1``/``y1`` exclusive)."""

    kind: str
    color: str
    size: str
    cell: int
    box: tuple[int, int, int, int]

    @property
    def position(self) -> str:
        """The canonical position answer, e.g. ``"top left"``."""
        return POSITIONS[self.cell]

    @property
    def area(self) -> int:
        """Pixels the shape covers when drawn."""
        return _drawn_area(self.kind, self.box[2] - self.box[0])

    @property
    def name(self) -> str:
        """``"red circle"``: unique within a scene (no two shapes share kind and colour)."""
        return f"{self.color} {self.kind}"


class QA(NamedTuple):
    """One question with its canonical answer and question type."""

    question: str
    answer: str
    qtype: str


class EvalQuestion(NamedTuple):
    """A held-out question about one image, asked on its own (single turn)."""

    image: Image.Image
    question: str
    answer: str
    qtype: str
    image_id: str


def sample_rng(seed: int, split: str, index: int) -> random.Random:
    """The random stream of image ``index`` of ``split``; disjoint from every other (seed, split, index)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return random.Random(f"{_SEED_PREFIX}/{int(seed)}/{split}/{int(index)}")


def _side_range(size: str, image_size: int) -> tuple[int, int]:
    cell = image_size / 3
    if size == "small":
        return round(SMALL_SIDE[0] * image_size), round(SMALL_SIDE[1] * image_size)
    # The biggest side that fits in a cell with a margin, so shapes in neighbouring cells never touch.
    hi = math.floor(cell - 2)
    return min(round(BIG_SIDE_MIN * image_size), hi), hi


def sample_scene(rng: random.Random, image_size: int = IMAGE_SIZE, max_shapes: int = MAX_SHAPES) -> list[Shape]:
    """Draw one to ``max_shapes`` (at most three) shapes in distinct cells, with distinct (kind, colour) pairs."""
    if image_size < 36:
        raise ValueError(f"image_size {image_size} is too small for legible shapes (>= 36)")
    if not 1 <= max_shapes <= MAX_SHAPES:
        raise ValueError(f"max_shapes must be 1..{MAX_SHAPES}, got {max_shapes}")
    count = rng.randint(1, max_shapes)
    cells = rng.sample(range(9), count)
    cell_side = image_size / 3
    shapes: list[Shape] = []
    used: set[tuple[str, str]] = set()
    for cell in sorted(cells):
        while True:  # Rejection keeps (kind, colour) unique so "the red circle" always names one shape.
            kind, color = rng.choice(SHAPES), rng.choice(tuple(COLORS))
            if (kind, color) not in used:
                used.add((kind, color))
                break
        size = rng.choice(SIZES)
        side = rng.randint(*_side_range(size, image_size))
        row, col = divmod(cell, 3)
        xy = []
        for start in (col * cell_side, row * cell_side):
            lo = math.ceil(start + 0.5)
            hi = math.floor(start + cell_side - 0.5 - side)
            xy.append(rng.randint(lo, max(lo, hi)))
        x0, y0 = xy
        shapes.append(Shape(kind, color, size, cell, (x0, y0, x0 + side, y0 + side)))
    return shapes


def _polygon(kind: str, box: tuple[int, int, int, int]) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    s = x1 - x0
    if kind == "triangle":
        return [(x0, y1 - 1), (x1 - 1, y1 - 1), (x0 + (s - 1) / 2, y0)]
    if kind == "star":
        cx, cy, r = x0 + (s - 1) / 2, y0 + (s - 1) / 2, (s - 1) / 2
        # Fatter than a geometric star (inner ratio 0.38) so points survive at ~11 px.
        inner = 0.47 * r
        # The star's points reach only cos(36 deg) = 0.81 r below the centre; shift down to fill the box.
        cy += r * (1 - math.cos(math.pi / 5)) / 2
        return [
            (
                cx + (r if i % 2 == 0 else inner) * math.sin(i * math.pi / 5),
                cy - (r if i % 2 == 0 else inner) * math.cos(i * math.pi / 5),
            )
            for i in range(10)
        ]
    raise ValueError(f"unknown shape {kind!r}")


def render_scene(shapes: list[Shape], rng: random.Random, image_size: int = IMAGE_SIZE) -> Image.Image:
    """Draw ``shapes`` on a plain or mildly noisy light background (RGB, ``image_size`` square)."""
    size = (image_size, image_size)
    if rng.random() < 0.5:
        image = Image.new("RGB", size, rng.choice(PLAIN_BACKGROUNDS))
    else:
        base = Image.new("RGB", size, rng.choice(NOISY_BACKGROUNDS))
        raw = Image.frombytes("RGB", size, rng.randbytes(3 * image_size * image_size))
        noise = raw.point(lambda v: v * (2 * NOISE_AMPLITUDE + 1) // 256)  # uniform 0 .. 2A
        image = ImageChops.add(base, noise, offset=-NOISE_AMPLITUDE)
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        fill = tuple(max(0, min(255, c + rng.randint(-COLOR_JITTER, COLOR_JITTER))) for c in COLORS[shape.color])
        _draw_shape(draw, shape.kind, shape.box, fill)
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif kind == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif kind == "cross":
        # Two bars a third of the side thick, in whole pixels so the plus is symmetric.
        arm = round((x1 - x0) / 3)
        draw.rectangle((x0 + arm, y0, x1 - 1 - arm, y1 - 1), fill=fill)
        draw.rectangle((x0, y0 + arm, x1 - 1, y1 - 1 - arm), fill=fill)
    else:
        draw.polygon(_polygon(kind, box), fill=fill)


@functools.cache
def _drawn_area(kind: str, side: int) -> int:
    mask = Image.new("L", (side, side), 0)
    _draw_shape(ImageDraw.Draw(mask), kind, (0, 0, side, side), 1)
    return sum(mask.tobytes())


def describe(shapes: list[Shape]) -> str:
    """The canonical caption: every shape in reading order, e.g. ``"A big red circle at the top left."``."""
    parts = [f"a {s.size} {s.color} {s.kind} {POSITION_PHRASES[s.cell]}" for s in sorted(shapes, key=lambda s: s.cell)]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def _refs(shape: Shape, shapes: list[Shape], attribute: str) -> list[str]:
    """Unambiguous noun phrases for ``shape`` that do not give away ``attribute`` (its kind or colour)."""
    if len(shapes) == 1:
        # "What shape is the shape?" would be odd; colour questions may say either.
        return ["the object"] if attribute == "kind" else ["the shape", "the object"]
    refs = [f"the object {POSITION_PHRASES[shape.cell]}"]  # one shape per cell: always unique
    if attribute == "kind" and sum(s.color == shape.color for s in shapes) == 1:
        refs.append(f"the {shape.color} object")
    if attribute == "color" and sum(s.kind == shape.kind for s in shapes) == 1:
        refs.append(f"the {shape.kind}")
    return refs


def _candidates(shapes: list[Shape]) -> dict[str, list[tuple[list[str], str]]]:
    """Every askable fact, grouped by qtype, as (phrasings, answer)."""
    single = len(shapes) == 1
    out: dict[str, list[tuple[list[str], str]]] = {q: [] for q in QTYPES}
    for s in shapes:
        shape_qs = []
        for ref in _refs(s, shapes, "kind"):
            shape_qs += [f"What shape is {ref}?", f"What is the shape of {ref}?"]
        if single:
            shape_qs += ["What shape is in the image?", "Which shape is shown?"]
        out["shape"].append((shape_qs, s.kind))

        color_qs = []
        for ref in _refs(s, shapes, "color"):
            color_qs += [f"What color is {ref}?", f"What is the color of {ref}?"]
        out["color"].append((color_qs, s.color))

        ref = "the shape" if single else f"the {s.name}"
        position_qs = [f"Where is {ref}?", f"Where is {ref} in the image?", f"In which part of the image is {ref}?"]
        out["position"].append((position_qs, s.position))

    count_qs = ["How many shapes are there?", "How many shapes are in the image?", "How many objects can you see?"]
    out["count"].append((count_qs, str(len(shapes))))

    for a, b in itertools.combinations(shapes, 2):
        big, small = (a, b) if a.area > b.area else (b, a)
        if big.size == "big" and small.size == "small" and big.area >= BIGGER_MIN_AREA_RATIO * small.area:
            pair = []
            for first, second in ((a, b), (b, a)):  # both orders, so the answer is not always the first
                pair += [
                    f"Which is bigger, the {first.name} or the {second.name}?",
                    f"Which shape is larger, the {first.name} or the {second.name}?",
                ]
            out["bigger"].append((pair, f"the {big.name}"))

    out["describe"].append((list(DESCRIBE_PROMPTS), describe(shapes)))
    return out


def ask(shapes: list[Shape], rng: random.Random, n_turns: int) -> list[QA]:
    """Up to ``n_turns`` questions about different facts: a qtype uniformly among those still askable,
    then one of its facts and one phrasing uniformly."""
    pool = _candidates(shapes)
    turns: list[QA] = []
    while len(turns) < n_turns:
        open_types = [q for q in QTYPES if pool[q]]
        if not open_types:
            break
        qtype = rng.choice(open_types)
        phrasings, answer = pool[qtype].pop(rng.randrange(len(pool[qtype])))
        turns.append(QA(rng.choice(phrasings), answer, qtype))
    return turns


def ask_each_type(shapes: list[Shape], rng: random.Random) -> list[QA]:
    """One question of every qtype askable about ``shapes`` (in ``QTYPES`` order), for evaluation."""
    turns = []
    for qtype, facts in _candidates(shapes).items():
        if facts:
            phrasings, answer = rng.choice(facts)
            turns.append(QA(rng.choice(phrasings), answer, qtype))
    return turns


def make_sample(
    rng: random.Random, image_size: int = IMAGE_SIZE, max_shapes: int = MAX_SHAPES
) -> tuple[Image.Image, list[QA], str]:
    """One image, up to ``TRAIN_TURNS`` question turns ``(question, answer, qtype)`` and its caption.

    ``rng`` is normally :func:`sample_rng`'s; the draws happen in a fixed order (scene, pixels,
    questions), so the same stream always gives the same sample.
    """
    shapes = sample_scene(rng, image_size, max_shapes)
    image = render_scene(shapes, rng, image_size)
    turns = ask(shapes, rng, TRAIN_TURNS)
    return image, turns, describe(shapes)


def conversation(turns: list[QA]) -> list[dict[str, str]]:
    """LLaVA-format turns; the first human turn starts with ``<image>\\n``."""
    out = []
    for k, qa in enumerate(turns):
        out.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + qa.question})
        out.append({"from": "gpt", "value": qa.answer})
    return out


def image_id(split: str, index: int) -> str:
    """The record id and image file stem of image ``index`` of ``split``."""
    return f"{split}-{index:06d}"


def generate_dataset(
    out_dir: str | os.PathLike,
    n_images: int,
    seed: int,
    split: str = "train",
    image_size: int = IMAGE_SIZE,
    *,
    start: int = 0,
    max_shapes: int = MAX_SHAPES,
    stem: str | None = None,
) -> dict[str, Path]:
    """Write ``images/{split}-NNNNNN.png``, ``{stem}.json`` (up to ``TRAIN_TURNS`` QA turns per image) and
    ``{stem}_captions.json`` (one caption turn per image, for stage 1) under ``out_dir``, for images
    ``start .. start+n_images-1`` with at most ``max_shapes`` shapes each; ``stem`` defaults to ``split``.

    The output is a pure function of the arguments: image ``i`` is the same whatever ``n_images`` is, so a
    bigger set extends a smaller one. Train and held-out files can share one ``out_dir``; their names never
    clash (give a second train set over other indices its own ``stem``).
    """
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    qa_records, caption_records = [], []
    for index in range(start, start + n_images):
        image, turns, caption = make_sample(sample_rng(seed, split, index), image_size, max_shapes)
        ident = image_id(split, index)
        rel = f"images/{ident}.png"
        image.save(out / rel, format="PNG")
        qa_records.append({"id": ident, "image": rel, "conversations": conversation(turns)})
        caption_records.append(
            {
                "id": ident,
                "image": rel,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{CAPTION_PROMPT}"},
                    {"from": "gpt", "value": caption},
                ],
            }
        )
    stem = stem or split
    paths = {"qa": out / f"{stem}.json", "captions": out / f"{stem}_captions.json", "images": out / "images"}
    paths["qa"].write_text(json.dumps(qa_records, indent=1) + "\n")
    paths["captions"].write_text(json.dumps(caption_records, indent=1) + "\n")
    return paths


def iter_questions(
    n_images: int, seed: int, split: str = "heldout", image_size: int = IMAGE_SIZE, start: int = 0
) -> Iterator[EvalQuestion]:
    """One question of every askable qtype for images ``start .. start+n_images-1`` of ``split``.

    The images are exactly those :func:`generate_dataset` writes for the same arguments; the
    questions are drawn from a separate stream so they are balanced across qtypes (five per image,
    plus ``bigger`` where it is askable) and asked one per conversation, as a user would.
    """
    for index in range(start, start + n_images):
        rng = sample_rng(seed, split, index)
        shapes = sample_scene(rng, image_size)
        image = render_scene(shapes, rng, image_size)
        question_rng = random.Random(f"{_SEED_PREFIX}/{int(seed)}/{split}/{int(index)}/eval")
        for qa in ask_each_type(shapes, question_rng):
            yield EvalQuestion(image, qa.question, qa.answer, qa.qtype, image_id(split, index))


def normalize_answer(text: str) -> str:
    """The form exact match compares: lower case, single spaces, no trailing full stop."""
    return " ".join(text.strip().lower().split()).rstrip(".").strip()


def answers_match(prediction: str, answer: str) -> bool:
    """Exact match after :func:`normalize_answer`, so "Red." counts for "red" but "dark red" does not."""
    return normalize_answer(prediction) == normalize_answer(answer)
