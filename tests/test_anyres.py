"""LLaVA-1.6 ("anyres") geometry and preprocessing against transformers' LlavaNextProcessor (PIL backend), at the
released 336-pixel tiles and pinpoints; and the original's rules (tie-break order, truncating unpad, sequence cap)."""

from __future__ import annotations

import types

import pytest
import torch
from transformers import AutoTokenizer, LlavaNextProcessor
from transformers.image_processing_utils import select_best_resolution

from minillava.anyres import best_resolution, num_features, num_tiles
from minillava.config import AnyresConfig, ImageConfig, LlavaConfig, TextConfig, VisionConfig
from minillava.image import anyres_pixel_values, preprocess_anyres
from minillava.processor import load_processor
from tests.next_reference import REAL_PINPOINTS, png, random_image, tf_image_processor, transposed
from tests.sp_fixtures import VOCAB_SIZE, write_tokenizer_dir

IMAGE_ID = VOCAB_SIZE
REAL = [tuple(p) for p in REAL_PINPOINTS]  # transformers reads these as (height, width)
ORIGINAL = [tuple(p) for p in transposed(REAL_PINPOINTS)]  # original LLaVA reads the same list as (width, height)
IMAGE = ImageConfig(mode="anyres")  # CLIP-L/336: shortest edge 336, 336 crop, bicubic, OpenAI mean/std

# (height, width) of images that pick each grid, ties (both sides within one tile), 1-pixel and 3-pixel strips,
# sizes where truncating and rounding unpad differ (110x352, 176x55), and an odd padding (768x767).
SIZES = {
    "1x2": (300, 500),
    "2x1": (500, 300),
    "2x2": (1000, 1000),
    "3x1": (1000, 337),
    "1x3": (200, 1000),
    "tie-50": (50, 50),
    "tie-336": (336, 336),
    "tie-100x200": (100, 200),
    "strip-60x1": (60, 1),
    "strip-3x90": (3, 90),
    "unpad-110x352": (110, 352),
    "unpad-176x55": (176, 55),
    "odd-768x767": (768, 767),
}


def tf_count(height: int, width: int, pinpoints) -> int:
    """transformers' LlavaNextProcessor placeholder count for one image (its own method, CLIP-L/336 settings)."""
    proc = types.SimpleNamespace(
        image_processor=types.SimpleNamespace(image_grid_pinpoints=[list(p) for p in pinpoints]),
        patch_size=14,
        num_additional_image_tokens=1,
    )
    proc._get_unpadded_features = types.MethodType(LlavaNextProcessor._get_unpadded_features, proc)
    return LlavaNextProcessor._get_number_of_features(proc, height, width, 336, 336) - 1  # "default" drops CLS


def count(height: int, width: int, pinpoints, rounding: str = "round") -> int:
    kwargs = {"tile": 336, "side": 24, "rows_per_tile": 576, "merge": "spatial_unpad"}
    return num_features(height, width, pinpoints=pinpoints, rounding=rounding, **kwargs)


def test_best_resolution_and_counts_match_transformers():
    sizes = [(h, w) for h in range(1, 1101, 23) for w in range(1, 1101, 19)] + list(SIZES.values())
    sizes += [(1, w) for w in (1, 5, 1008, 1009, 1100)] + [(h, 1) for h in (1, 1009)]  # every canvas keeps 0 pixels
    for h, w in sizes:
        assert best_resolution(h, w, REAL) == select_best_resolution((h, w), REAL_PINPOINTS), (h, w)
        assert count(h, w, REAL) == tf_count(h, w, REAL), (h, w)


def test_the_two_references_counts():
    """The measured figures: a tie picks another grid (200x100: original 876, transformers 1752); truncating unpad
    keeps fewer rows where the division lands just under an integer (352x110: 1262 vs 1360)."""
    assert (count(100, 200, ORIGINAL, "truncate"), count(100, 200, REAL)) == (876, 1752)
    assert (count(110, 352, ORIGINAL, "truncate"), count(110, 352, REAL)) == (1262, 1360)
    assert count(110, 352, ORIGINAL, "round") == 1360  # the grid agrees there; only the rounding differs
    for h, w, expected in [(300, 500, 1560), (500, 300, 1576), (1000, 1000, 2928), (50, 50, 1176), (480, 640, 2340)]:
        assert count(h, w, ORIGINAL, "truncate") == count(h, w, REAL) == expected


@pytest.mark.parametrize("size", list(SIZES.values()), ids=list(SIZES))
def test_pixels_match_transformers(size):
    image = random_image(*size, seed=sum(size))
    expected = tf_image_processor(336, REAL_PINPOINTS)(image, return_tensors="pt")
    got = anyres_pixel_values(image, IMAGE, REAL)
    assert got.shape == expected["pixel_values"][0].shape
    assert got.shape[0] == num_tiles(*size, REAL, 336)
    assert torch.equal(got, expected["pixel_values"][0])
    assert expected["image_sizes"][0].tolist() == list(size)


@pytest.mark.parametrize("size", [(50, 50), (336, 336), (100, 200), (60, 1)], ids=str)
def test_original_tie_break_is_the_pinpoint_order(size):
    """Original LLaVA's (width, height) list, swapped pair by pair in the same order, picks its grid: in a tie the
    1x2 canvas is two tiles stacked (2x1), where transformers' reading puts them side by side."""
    image = random_image(*size, seed=1)
    original = anyres_pixel_values(image, IMAGE, ORIGINAL)
    ours_tf = anyres_pixel_values(image, IMAGE, REAL)
    reference = tf_image_processor(336, transposed(REAL_PINPOINTS))(image, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(original, reference)
    assert best_resolution(*size, ORIGINAL) == (672, 336) and best_resolution(*size, REAL) == (336, 672)
    assert not torch.equal(original[1:], ours_tf[1:])  # the base tile is the same, the grid tiles are not


def test_batch_pads_the_tile_axis_with_zeros():
    images = [png(random_image(300, 500)), png(random_image(1000, 1000, seed=2))]
    pixels, sizes = preprocess_anyres(images, IMAGE, REAL)
    expected = tf_image_processor(336, REAL_PINPOINTS)(
        [random_image(300, 500), random_image(1000, 1000, seed=2)], return_tensors="pt"
    )
    assert pixels.shape == (2, 5, 3, 336, 336) and not pixels[0, 3:].any()
    assert torch.equal(pixels, expected["pixel_values"]) and torch.equal(sizes, expected["image_sizes"])


def next_checkpoint(path, **anyres):
    """A converted-looking LLaVA-1.6 directory at CLIP-L/336 shapes (the processor never builds the model)."""
    write_tokenizer_dir(path, legacy=True)
    LlavaConfig(
        vision=VisionConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2),
        text=TextConfig(
            vocab_size=VOCAB_SIZE + 64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
            rms_norm_eps=1e-5, pad_token_id=VOCAB_SIZE + 1, model_type="mistral",
        ),
        image_token_id=IMAGE_ID,
        image=IMAGE,
        chat_template="mistral_instruct",
        anyres=AnyresConfig(grid_pinpoints=REAL_PINPOINTS, **anyres),
    ).save(path)  # fmt: skip
    return path


def test_processor_matches_llava_next_processor(tmp_path):
    path = next_checkpoint(tmp_path)
    ours = load_processor(path)
    theirs = LlavaNextProcessor(
        image_processor=tf_image_processor(336, REAL_PINPOINTS),
        tokenizer=AutoTokenizer.from_pretrained(path),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )
    images = [random_image(300, 500), random_image(110, 352, seed=3), random_image(50, 50, seed=4)]
    texts = ["[INST] <image>\nWhat is this? [/INST]", "[INST] <image>\nAnd <image> these? [/INST]"]
    got = ours(texts, images=[[png(images[0])], [png(images[1]), png(images[2])]])
    expected = theirs(text=texts, images=images, padding=True, return_tensors="pt")
    assert torch.equal(got["pixel_values"], expected["pixel_values"])
    assert torch.equal(got["image_sizes"], expected["image_sizes"])
    assert got["pixel_values"].shape == (3, 3, 3, 336, 336)
    counts = (got["input_ids"] == IMAGE_ID).sum(1).tolist()
    assert counts == (expected["input_ids"] == IMAGE_ID).sum(1).tolist() == [1560, 1360 + 1176]
    assert ours.image_tokens(110, 352) == 1360


def test_original_cap_refuses_what_the_original_would_cut(tmp_path):
    ours = load_processor(next_checkpoint(tmp_path, unpad_rounding="truncate", max_sequence_length=2000))
    image = png(random_image(300, 500))
    assert ours("[INST] <image>\nHi [/INST]", images=[image])["input_ids"].shape[1] < 2000
    with pytest.raises(ValueError, match=r"\d+ tokens with its image rows, over this checkpoint's 2000"):
        ours("[INST] <image>\n<image>\nHi [/INST]", images=[image, image])
