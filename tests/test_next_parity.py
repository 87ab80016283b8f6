"""LLaVA-1.6 models against their references, fp32 on CPU: llava-hf checkpoints against transformers'
LlavaNextForConditionalGeneration, original-layout checkpoints against the original's behaviour (transformers with
the original's pinpoint reading and truncating unpad, see ``tests/next_reference.py``); conversion, direct loading
and export."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

import minillava
from minillava.config import LlavaConfig
from minillava.generate import generate
from tests.hf_reference import IMAGE_TOKEN_ID, VOCAB
from tests.next_reference import (
    ORIGINAL_PINPOINTS,
    make_next_model,
    original_unpad,
    random_image,
    save_next_hf,
    save_original_next,
    tf_image_processor,
    transposed,
)
from weights_convert.__main__ import main as convert_main

FP32 = {"rtol": 1e-5, "atol": 1e-5}
# (height, width): each grid of the tiny pinpoints, a tie (one tile), a 1-pixel strip, and 47x188, where truncating
# and rounding unpad keep different rows (42 vs 68 placeholders).
ONE_IMAGE = [(30, 50), (50, 30), (90, 90), (20, 20), (1, 5), (40, 100), (47, 188)]


def prompt_rows(config: LlavaConfig, images, placeholder: int, seed: int = 0) -> list[list[int]]:
    """One row per prompt: BOS, a few words, then per image its placeholders and a few words (row i's words drawn
    from seed ``seed + i``)."""
    rows = []
    for i, row_images in enumerate(images):
        gen = torch.Generator().manual_seed(seed + i)
        row = [1] + torch.randint(3, IMAGE_TOKEN_ID, (3,), generator=gen).tolist()
        for image in row_images:
            row += [placeholder] * config.anyres_token_count(image.height, image.width)
            row += torch.randint(3, IMAGE_TOKEN_ID, (4,), generator=gen).tolist()
        rows.append(row)
    return rows


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(map(len, rows))
    ids = torch.tensor([[0] * (longest - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def compare(reference, ours, images, placeholder: int, pinpoints=None, seed: int = 0, unpad=None):
    """Logits of both models on the same prompts and pixels (transformers' processor's); real positions only."""
    flat = [image for row in images for image in row]
    pixels = tf_image_processor(pinpoints=pinpoints)(flat, return_tensors="pt") if flat else {}
    rows = prompt_rows(ours.config, images, placeholder, seed)
    ids, mask = left_pad(rows)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ref_ids = ids.masked_fill(ids == placeholder, IMAGE_TOKEN_ID)
    with torch.no_grad(), (unpad or _nothing)():
        expected = reference(input_ids=ref_ids, attention_mask=mask, position_ids=positions, **pixels).logits
    with torch.no_grad():
        got = ours(ids, pixels.get("pixel_values"), attention_mask=mask, image_sizes=pixels.get("image_sizes")).logits
    real = mask.bool()
    assert expected[real].std() > 1.0, "reference logits too flat to catch bugs"
    assert_close(got[real], expected[real], **FP32)
    return got


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A llava-hf LLaVA-1.6 (Mistral) saved as on the hub (4.x names, sharded), converted."""
    tmp = tmp_path_factory.mktemp("next-hf")
    hf = make_next_model(seed=1)
    src = save_next_hf(hf, tmp / "llava-v1.6-mistral-7b-hf", layout="v4", max_shard_size="40KB")
    assert len(list(src.glob("*.safetensors"))) > 1
    assert convert_main([str(src), str(tmp / "converted")]) == 0
    return hf, minillava.load(tmp / "converted"), src, tmp / "converted"


@pytest.mark.parametrize("size", ONE_IMAGE, ids=str)
def test_one_image_matches_transformers(hf_pair, size):
    hf, ours, _, _ = hf_pair
    compare(hf, ours, [[random_image(*size, seed=size[0])]], IMAGE_TOKEN_ID)


def test_two_images_in_a_prompt_and_a_left_padded_batch(hf_pair):
    hf, ours, _, _ = hf_pair
    a, b, c = random_image(30, 50), random_image(90, 90, seed=1), random_image(47, 188, seed=2)
    compare(hf, ours, [[a, b]], IMAGE_TOKEN_ID, seed=1)
    batch = [[c], [a, b], []]  # 4, 5 and no tiles: the first image's pixels carry a zero tile of padding
    got = compare(hf, ours, batch, IMAGE_TOKEN_ID, seed=2)
    # Each row as it would be alone: left padding changes nothing.
    alone = compare(hf, ours, [[a, b]], IMAGE_TOKEN_ID, seed=3)
    assert_close(got[1, -alone.shape[1] :], alone[0], rtol=0, atol=1e-5)


def test_loss_on_a_right_padded_batch_matches_transformers(hf_pair):
    hf, ours, _, _ = hf_pair
    images = [[random_image(47, 188)], [random_image(30, 50, seed=1), random_image(20, 20, seed=2)]]
    pixels = tf_image_processor()([image for row in images for image in row], return_tensors="pt")
    rows = prompt_rows(ours.config, images, IMAGE_TOKEN_ID, seed=5)
    longest = max(map(len, rows))
    ids = torch.tensor([r + [0] * (longest - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows])
    labels = ids.masked_fill((mask == 0) | (ids == IMAGE_TOKEN_ID), -100)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, labels=labels, **pixels).loss
        got = ours(ids, pixels["pixel_values"], mask, labels, image_sizes=pixels["image_sizes"]).loss
    assert_close(got, expected, **FP32)


def test_greedy_generation_matches_transformers(hf_pair):
    """A left-padded batch (two images of different sizes, one, none), token for token; and each row alone."""
    hf, ours, _, _ = hf_pair
    images = [[random_image(30, 50), random_image(20, 20, seed=1)], [random_image(47, 188, seed=2)], []]
    pixels = tf_image_processor()([image for row in images for image in row], return_tensors="pt")
    ids, mask = left_pad(prompt_rows(ours.config, images, IMAGE_TOKEN_ID, seed=6))
    with torch.no_grad():
        expected = hf.generate(
            input_ids=ids, attention_mask=mask, **pixels, max_new_tokens=12, do_sample=False, pad_token_id=0,
            eos_token_id=None, suppress_tokens=[IMAGE_TOKEN_ID],
        )[:, ids.shape[1] :]  # fmt: skip
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[], **pixels)
    assert got.tolist() == expected.tolist()
    alone_ids, _ = left_pad(prompt_rows(ours.config, images[1:2], IMAGE_TOKEN_ID, seed=7))
    assert torch.equal(alone_ids[0], ids[1, -alone_ids.shape[1] :])
    alone = generate(ours, alone_ids, pixels["pixel_values"][2:, :4], max_new_tokens=12, eos_token_id=[],
                     image_sizes=pixels["image_sizes"][2:])  # fmt: skip
    assert alone[0].tolist() == got[1].tolist()


def test_converted_config_and_template(hf_pair):
    _, ours, _, converted = hf_pair
    anyres = json.loads((converted / "config.json").read_text())["anyres"]
    assert anyres == {
        "grid_pinpoints": [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]],
        "merge": "spatial_unpad",
        "unpad_rounding": "round",
        "max_sequence_length": None,
    }
    assert ours.config.chat_template == "mistral_instruct" and ours.config.text.model_type == "mistral"
    assert ours.config.image.mode == "anyres"


def test_transformers_5_layout_and_direct_load(hf_pair, tmp_path):
    hf, ours, src, _ = hf_pair
    v5 = save_next_hf(hf, tmp_path / "v5")  # transformers 5.x names: vision_tower.* without vision_model.
    assert any(k.startswith("vision_tower.embeddings") for k in load_file(v5 / "model.safetensors"))
    for model in (minillava.load(v5), minillava.load(src)):
        for name, tensor in ours.state_dict().items():
            assert torch.equal(model.state_dict()[name], tensor), name


def test_export_loads_in_transformers_with_the_same_logits(hf_pair, tmp_path):
    from transformers import LlavaNextForConditionalGeneration

    hf, ours, src, converted = hf_pair
    out = tmp_path / "exported"
    assert convert_main(["--to", "hf", str(converted), str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava_next" and config["text_config"]["sliding_window"] is None
    original = {k: v for f in src.glob("*.safetensors") for k, v in load_file(f).items()}
    exported = load_file(out / "model.safetensors")
    assert original.keys() == exported.keys() and all(torch.equal(original[k], exported[k]) for k in original)
    back = LlavaNextForConditionalGeneration.from_pretrained(out).eval()
    compare(back, ours, [[random_image(47, 188)], [random_image(20, 20, seed=1)]], IMAGE_TOKEN_ID, seed=3)


# --- original layout (liuhaotian/llava-v1.6-mistral-7b) ------------------------------------------------------------


@pytest.fixture(scope="module")
def original_pair(tmp_path_factory):
    """An original llava_mistral checkpoint (fp16 safetensors, a 64-wide tower inside, no CLIP directory) and its
    reference: the same weights in transformers, pinpoints read the original's way."""
    tmp = tmp_path_factory.mktemp("next-original")
    hf = make_next_model(seed=2, fp16_values=True, vision={"hidden_size": 64, "num_attention_heads": 1})
    src = save_original_next(hf, tmp / "llava-v1.6-mistral-7b")
    hf.config.image_grid_pinpoints = transposed(ORIGINAL_PINPOINTS)
    assert convert_main([str(src), str(tmp / "converted")]) == 0
    return hf, minillava.load(tmp / "converted", dtype=torch.float32), src


@pytest.mark.parametrize("size", ONE_IMAGE, ids=str)
def test_original_matches_the_original_rules(original_pair, size):
    hf, ours, _ = original_pair
    image = random_image(*size, seed=size[0])
    compare(hf, ours, [[image]], VOCAB, transposed(ORIGINAL_PINPOINTS), unpad=original_unpad)


def test_original_two_images_and_padding(original_pair):
    hf, ours, _ = original_pair
    images = [[random_image(47, 188)], [random_image(20, 20, seed=1), random_image(90, 90, seed=2)]]
    compare(hf, ours, images, VOCAB, transposed(ORIGINAL_PINPOINTS), seed=4, unpad=original_unpad)


def test_original_rules_are_recorded(original_pair):
    _, ours, src = original_pair
    anyres = ours.config.anyres
    assert [list(p) for p in anyres.grid_pinpoints] == transposed(ORIGINAL_PINPOINTS)
    assert (anyres.unpad_rounding, anyres.max_sequence_length) == ("truncate", 4096)
    assert ours.config.image_token_id == VOCAB and ours.config.chat_template == "mistral_instruct"
    assert ours.config.anyres_token_count(47, 188) == 42  # transformers' rounding would give 68
    direct = minillava.load(src, dtype=torch.float32)
    assert direct.config == ours.config
    assert all(torch.equal(direct.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_original_flat_merge(tmp_path, capsys):
    """``mm_patch_merge_type: flat``: every tile's rows in a row, no newline. The reference is transformers' own tower
    and projector on the same tiles, their rows spliced in order, run through its decoder."""
    from minillava.anyres import num_tiles

    hf = make_next_model(seed=4, fp16_values=True, vision={"hidden_size": 64, "num_attention_heads": 1})
    src = save_original_next(hf, tmp_path / "llava-v1.6-mistral-7b", mm_patch_merge_type="flat")
    assert convert_main([str(src), str(tmp_path / "converted")]) == 0
    ours = minillava.load(tmp_path / "converted", dtype=torch.float32)
    assert ours.image_newline is None and ours.config.anyres.merge == "flat"
    images = [random_image(30, 50), random_image(20, 20, seed=1)]
    pixels = tf_image_processor(pinpoints=transposed(ORIGINAL_PINPOINTS))(images, return_tensors="pt")
    tiles = [num_tiles(h, w, ours.config.anyres.grid_pinpoints, 28) for h, w in pixels["image_sizes"].tolist()]
    ids, _ = left_pad(prompt_rows(ours.config, [images], VOCAB, seed=8))
    assert (ids == VOCAB).sum() == 16 * sum(tiles) == 16 * (5 + 3)
    with torch.no_grad():
        flat = torch.cat([pixels["pixel_values"][i, :n] for i, n in enumerate(tiles)])
        rows = hf.model.multi_modal_projector(
            hf.model.vision_tower(flat, output_hidden_states=True).hidden_states[-2][:, 1:]
        )
        embeds = hf.get_input_embeddings()(ids.masked_fill(ids == VOCAB, 0))
        embeds = embeds.masked_scatter((ids == VOCAB)[..., None], rows.reshape(-1, rows.shape[-1]))
        expected = hf(inputs_embeds=embeds).logits
        got = ours(ids, pixels["pixel_values"], image_sizes=pixels["image_sizes"]).logits
    assert expected.std() > 1.0
    assert_close(got, expected, **FP32)
    capsys.readouterr()
    assert convert_main(["--to", "hf", "--pad-vocab", str(tmp_path / "converted"), str(tmp_path / "hf")]) == 1
    assert "only implements spatial_unpad" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "needle"), [({"sliding_window": 4096}, "sliding_window is 4096:"), ({}, "(Mistral")])
def test_a_sliding_window_is_refused(tmp_path, capsys, text, needle):
    hf = make_next_model(seed=5)
    src = save_next_hf(hf, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["text_config"].pop("sliding_window", None)
    config["text_config"].update(text)
    (src / "config.json").write_text(json.dumps(config))
    assert convert_main([str(src), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert needle in err and "set sliding_window to null" in err and not (tmp_path / "out").exists()
