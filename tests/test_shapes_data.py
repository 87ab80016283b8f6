"""The synthetic shapes set: determinism, split disjointness, answers true to the pixels, tokenizer."""

from __future__ import annotations

import hashlib
import json
import random
import re

import pytest
import sentencepiece as spm

from minillava.shapes.data import (
    COLORS,
    POSITION_PHRASES,
    POSITIONS,
    QTYPES,
    SHAPES,
    TRAIN_TURNS,
    answers_match,
    ask,
    describe,
    generate_dataset,
    iter_questions,
    make_sample,
    render_scene,
    sample_rng,
    sample_scene,
)
from minillava.shapes.tokenizer import IMAGE_TOKEN, dataset_texts, train_tokenizer, vicuna_v1_text


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _pixel_hash(image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


def test_same_seed_same_bytes(tmp_path):
    generate_dataset(tmp_path / "a", 12, seed=7, split="train")
    generate_dataset(tmp_path / "b", 12, seed=7, split="train")
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(a) == 12 + 2 and a == b
    generate_dataset(tmp_path / "c", 12, seed=8, split="train")
    c = _files(tmp_path / "c")
    assert all(a[k] != c[k] for k in a if k.endswith(".png"))


def test_image_index_does_not_depend_on_set_size(tmp_path):
    generate_dataset(tmp_path / "small", 3, seed=1, split="heldout")
    generate_dataset(tmp_path / "big", 6, seed=1, split="heldout")
    small, big = _files(tmp_path / "small"), _files(tmp_path / "big")
    assert all(big[k] == v for k, v in small.items() if k.endswith(".png"))
    assert json.loads(big["heldout.json"])[:3] == json.loads(small["heldout.json"])


def test_llava_format(tmp_path):
    paths = generate_dataset(tmp_path, 30, seed=0, split="train")
    records = json.loads(paths["qa"].read_text())
    captions = json.loads(paths["captions"].read_text())
    assert [r["id"] for r in records] == [c["id"] for c in captions]
    for rec, cap in zip(records, captions, strict=True):
        assert (tmp_path / rec["image"]).is_file() and rec["image"] == cap["image"]
        conv = rec["conversations"]
        assert 2 <= len(conv) <= 2 * TRAIN_TURNS and len(conv) % 2 == 0
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].startswith("<image>\n")
        assert all("<image>" not in t["value"] for t in conv[1:])
        assert len(cap["conversations"]) == 2 and cap["conversations"][0]["value"].startswith("<image>")
        assert cap["conversations"][1]["value"][0].isupper() and cap["conversations"][1]["value"].endswith(".")


def test_train_and_heldout_never_share_an_image():
    train = {_pixel_hash(make_sample(sample_rng(0, "train", i))[0]) for i in range(600)}
    heldout = {_pixel_hash(make_sample(sample_rng(0, "heldout", i))[0]) for i in range(300)}
    assert len(train) == 600 and len(heldout) == 300  # no repeats within a split either
    assert not train & heldout
    with pytest.raises(ValueError):
        sample_rng(0, "test", 0)


# --- answers checked against what is drawn, read back from the pixels --------------------------


def _objects_from_pixels(image) -> list[dict]:
    """Connected blobs of shape-coloured pixels, with colour, cell, side and a coarse kind."""
    n = image.size[0]
    px = image.load()
    # Backgrounds are light grey-ish (every channel >= 212); every palette colour has a channel < 70.
    mask = [[min(px[x, y]) < 140 for x in range(n)] for y in range(n)]
    seen = [[False] * n for _ in range(n)]
    objects = []
    for y0 in range(n):
        for x0 in range(n):
            if not mask[y0][x0] or seen[y0][x0]:
                continue
            stack, pixels = [(x0, y0)], []
            seen[y0][x0] = True
            while stack:
                x, y = stack.pop()
                pixels.append((x, y))
                for nx, ny in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
                    if 0 <= nx < n and 0 <= ny < n and mask[ny][nx] and not seen[ny][nx]:
                        seen[ny][nx] = True
                        stack.append((nx, ny))
            xs, ys = [p[0] for p in pixels], [p[1] for p in pixels]
            left, top, right, bottom = min(xs), min(ys), max(xs) + 1, max(ys) + 1
            mean = [sum(px[p][c] for p in pixels) / len(pixels) for c in range(3)]
            color = min(COLORS, key=lambda k: sum((a - b) ** 2 for a, b in zip(COLORS[k], mean, strict=True)))
            cx, cy = (left + right) / 2, (top + bottom) / 2
            cell = int(cy * 3 / n) * 3 + int(cx * 3 / n)
            side = max(right - left, bottom - top)
            filled = set(pixels)

            def row(y, filled=filled, left=left, right=right):
                return sum((x, y) in filled for x in range(left, right)) / (right - left)

            fill = len(pixels) / ((right - left) * (bottom - top))
            mid = (top + bottom - 1) // 2
            if fill > 0.95:
                kind = "square"
            elif row(bottom - 1) > 0.9:
                kind = "triangle"
            elif (left, top) not in filled and row(top) > 0.25 and fill < 0.65:
                kind = "cross"  # the top arm is a third of the width; a star's tip is a pixel or two
            elif fill > 0.7 and row(mid) > 0.9:
                kind = "circle"
            else:
                kind = "star"
            objects.append({"kind": kind, "color": color, "cell": cell, "side": side, "area": len(pixels)})
    return objects


def _resolve(ref: str, objects: list[dict]) -> dict:
    """The one object a question's noun phrase names; fails if it names none or several."""
    if ref in ("the shape", "the object"):
        matches = objects
    elif ref.startswith("the object "):
        matches = [o for o in objects if POSITION_PHRASES[o["cell"]] == ref[len("the object ") :]]
    elif ref.endswith(" object"):
        matches = [o for o in objects if o["color"] == ref.split()[1]]
    elif len(ref.split()) == 3:
        matches = [o for o in objects if (o["color"], o["kind"]) == tuple(ref.split()[1:])]
    else:
        matches = [o for o in objects if o["kind"] == ref.split()[1]]
    assert len(matches) == 1, (ref, objects)
    return matches[0]


def _expected(question: str, qtype: str, objects: list[dict]) -> str:
    if qtype == "count":
        return str(len(objects))
    if qtype == "describe":
        return "(caption)"
    if qtype == "bigger":
        a, b = re.search(r", (the .+) or (the .+)\?$", question).groups()
        oa, ob = _resolve(a, objects), _resolve(b, objects)
        # Clearly different: in drawn pixels and in extent, and the same way round in both.
        assert max(oa["area"], ob["area"]) >= 1.4 * min(oa["area"], ob["area"])
        assert (oa["area"] > ob["area"]) == (oa["side"] > ob["side"])
        return a if oa["area"] > ob["area"] else b
    # The noun phrase follows the question's last " is" or " of" ("What is the color of the star?");
    # only one-shape images get questions without one ("Which shape is shown?").
    ref = re.fullmatch(r".*(?: is| of) (the .+?)(?: in the image)?\?", question)
    obj = _resolve(ref.group(1) if ref else "the shape", objects)
    return {"shape": obj["kind"], "color": obj["color"], "position": POSITIONS[obj["cell"]]}[qtype]


@pytest.mark.parametrize("image_size", [72, 56, 96])
def test_answers_match_the_pixels(image_size):
    seen_types = set()
    n = 150 if image_size == 72 else 40
    for index in range(n):
        rng = sample_rng(3, "train", index)
        shapes = sample_scene(rng, image_size)
        image = render_scene(shapes, rng, image_size)
        turns = ask(shapes, rng, 6)
        objects = _objects_from_pixels(image)
        assert len(objects) == len(shapes), index  # no overlaps, nothing lost to the background
        kinds = sorted((o["kind"], o["color"], o["cell"]) for o in objects)
        assert kinds == sorted((s.kind, s.color, s.cell) for s in shapes), index
        for obj, shape in zip(sorted(objects, key=lambda o: o["cell"]), shapes, strict=True):
            assert (obj["side"] > image_size * 0.24) == (shape.size == "big")
        for question, answer, qtype in turns:
            seen_types.add(qtype)
            expected = _expected(question, qtype, objects)
            if qtype == "describe":
                assert answer == describe(shapes)
            else:
                assert answer == expected, (index, question, answer, objects)
    assert seen_types == set(QTYPES)


def test_caption_and_answer_vocabulary():
    vocab = {
        "shape": set(SHAPES),
        "color": set(COLORS),
        "count": {"1", "2", "3"},
        "position": set(POSITIONS),
    }
    for index in range(200):
        _, turns, caption = make_sample(sample_rng(0, "train", index))
        assert 1 <= len(turns) <= TRAIN_TURNS
        assert len({q for q, _, _ in turns}) == len(turns)
        assert re.fullmatch(r"A (small|big) [a-z]+ [a-z]+ (at|on|in) the [a-z ]+((, a| and a) .+)?\.", caption)
        for _, answer, qtype in turns:
            if qtype in vocab:
                assert answer in vocab[qtype]
            elif qtype == "bigger":
                assert re.fullmatch(r"the [a-z]+ [a-z]+", answer)


def test_iter_questions_matches_generated_images(tmp_path):
    generate_dataset(tmp_path, 5, seed=11, split="heldout")
    items = list(iter_questions(5, seed=11))
    from PIL import Image

    for item in items:
        with Image.open(tmp_path / "images" / f"{item.image_id}.png") as png:
            assert png.convert("RGB").tobytes() == item.image.tobytes()
    per_image = {}
    for item in items:
        per_image.setdefault(item.image_id, []).append(item.qtype)
    assert len(per_image) == 5
    for qtypes in per_image.values():
        assert {"shape", "color", "count", "position", "describe"} <= set(qtypes) <= set(QTYPES)
        assert len(qtypes) == len(set(qtypes))


def test_answers_match_normalises_only_case_space_and_full_stop():
    assert answers_match(" Red. ", "red")
    assert answers_match("A big red circle  at the top.", "A big red circle at the top.")
    assert not answers_match("dark red", "red")
    assert not answers_match("2 shapes", "2")


# --- tokenizer ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(dataset_texts(1000, seed=0), out / "a")
    train_tokenizer(dataset_texts(1000, seed=0), out / "b")
    return out


def test_tokenizer_is_deterministic(tokenizer_dir):
    assert _files(tokenizer_dir / "a") == _files(tokenizer_dir / "b")


def test_tokenizer_round_trip_and_pieces(tokenizer_dir):
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "a" / "tokenizer.model"))
    assert sp.vocab_size() == 640
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", IMAGE_TOKEN]
    assert (sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id()) == (1, 2, 0, -1)
    # Held-out text the tokenizer never saw: exact round trip, no unknowns, no byte fallback.
    for index in range(100):
        _, turns, caption = make_sample(sample_rng(5, "heldout", index))
        text = vicuna_v1_text([{"from": f, "value": v} for q, a, _ in turns for f, v in (("human", q), ("gpt", a))])
        for part in [caption, *text.split("</s>")]:
            ids = sp.encode(part)
            assert sp.decode(ids) == part
            assert 0 not in ids and not any(sp.is_byte(i) for i in ids)
    assert sp.encode("USER: <image>\n", out_type=str) == ["▁USER", ":", "▁", IMAGE_TOKEN, "\n"]
    for word in [*SHAPES, *COLORS, "ASSISTANT", "left", "center", "bottom", "bigger", "larger"]:
        assert len(sp.encode(word)) == 1, word
    # Text after "</s>" or "<image>\n" is encoded without the dummy-prefix "▁": those words are pieces too.
    for piece in ["USER", "What", "How", "Where", "Which", "\n"]:
        assert sp.id_to_piece(sp.piece_to_id(piece)) == piece, piece
    config = json.loads((tokenizer_dir / "a" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer" and config["add_bos_token"] and not config["add_eos_token"]


def test_tokenizer_loads_in_transformers_identically(tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir / "a"))
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "a" / "tokenizer.model"))
    rng = random.Random(0)
    for index in rng.sample(range(1000), 20):
        _, turns, _ = make_sample(sample_rng(0, "heldout", index))
        text = vicuna_v1_text([{"from": "human", "value": "<image>\n" + turns[0].question}])
        assert hf(text).input_ids == [1, *sp.encode(text)]


def test_one_shape_scenes_and_every_fact_asked():
    """The easy stage-2 round draws one-shape images; a one-shape image is asked every fact about it."""
    for index in range(100):
        image, turns, caption = make_sample(sample_rng(0, "train", index), max_shapes=1)
        assert image.size == (72, 72)
        assert caption.count(" a ") == 0 and caption.startswith("A ")
        assert sorted(q.qtype for q in turns) == sorted(["shape", "color", "count", "position", "describe"])
        assert next(q.answer for q in turns if q.qtype == "count") == "1"
    with pytest.raises(ValueError, match="max_shapes"):
        sample_scene(sample_rng(0, "train", 0), max_shapes=4)
