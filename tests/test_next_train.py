"""Training on a LLaVA-1.6 checkpoint: anyres samples (their placeholder counts vary with the image size), the
collator's tile padding, length grouping and the cut that never splits an image, and a real short run."""

from __future__ import annotations

import json
import random

import pytest
import torch

import minillava
from minillava.config import LlavaConfig
from minillava.data import Collator, LlavaDataset
from minillava.labels import IGNORE_INDEX, training_example, truncate
from minillava.processor import load_processor
from minillava.train import TrainConfig, set_trainable, train, with_dummy_image
from tests.next_reference import make_next_checkpoint, random_image

SIZES = [(20, 20), (30, 50), (50, 30), (90, 90), (40, 100)]  # (height, width): 36 to 88 placeholders


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random LLaVA-1.6 minillava checkpoint (28-px tiles, Mistral-style decoder) and a small dataset."""
    root = tmp_path_factory.mktemp("next-train")
    model_dir = make_next_checkpoint(root / "model")
    images = root / "images"
    images.mkdir()
    rng = random.Random(0)
    records = []
    for i in range(16):
        size = SIZES[i % len(SIZES)]
        random_image(*size, seed=i).save(images / f"{i}.png")
        answer = rng.choice(["wide", "tall", "square"])
        records.append(
            {
                "id": f"img{i}",
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat shape is the picture?"},
                    {"from": "gpt", "value": f"It is {answer}."},
                ],
            }
        )
    records.append({"id": "txt", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hi!"}]})
    (root / "data.json").write_text(json.dumps(records))
    return model_dir, root / "data.json", images


def test_training_example_matches_the_processor(tiny):
    model_dir, _, images = tiny
    proc = load_processor(model_dir)
    messages = [{"role": "user", "content": "<image>\nWhat shape?"}, {"role": "assistant", "content": "Wide."}]
    paths = [images / "1.png", images / "3.png"]
    messages[0]["content"] += " And <image>?"
    example = training_example(proc, messages, paths)
    prompt = proc.format_chat(messages, add_generation_prompt=False)
    batch = proc(prompt, images=paths)
    assert example["input_ids"].tolist() == batch["input_ids"][0].tolist()
    assert torch.equal(example["pixel_values"], batch["pixel_values"])
    assert torch.equal(example["image_sizes"], batch["image_sizes"])
    counts = [proc.image_tokens(*size) for size in (SIZES[1], SIZES[3])]
    assert (example["input_ids"] == proc.image_token_id).sum() == sum(counts) == 52 + 88
    supervised = example["labels"][example["labels"] != IGNORE_INDEX]
    assert proc.decode(supervised) == "Wide. "  # mistral_instruct ends an answer with " </s>"


def test_cut_never_splits_an_image_of_its_own_count():
    image = 9
    ids = [1, 2] + [image] * 5 + [3] + [image] * 7 + [4, 5]
    labels = list(range(len(ids)))
    assert truncate(ids, labels, 10, image, [5, 7]) == (ids[:8], labels[:8], 1)  # inside image 2: cut before it
    assert truncate(ids, labels, 15, image, [5, 7]) == (ids[:15], labels[:15], 2)
    assert truncate(ids, labels, 4, image, [5, 7]) == (ids[:2], labels[:2], 0)
    assert truncate(ids, labels, 99, image, [5, 7])[2] == 2


def test_collator_pads_tiles_and_lengths_count_image_rows(tiny):
    model_dir, data, images = tiny
    proc = load_processor(model_dir)
    dataset = LlavaDataset(data, images, proc)
    batch = Collator(proc.pad_token_id)([dataset[0], dataset[3], dataset[16]])  # 20x20 (3 tiles), 90x90 (5), text
    assert batch["pixel_values"].shape == (2, 5, 3, 28, 28) and not batch["pixel_values"][0, 3:].any()
    assert batch["image_sizes"].tolist() == [list(SIZES[0]), list(SIZES[3])]
    words = 6 + 3
    assert dataset.lengths[:5] == [words + proc.image_tokens(*size) for size in SIZES]
    model = minillava.load(model_dir)
    with torch.no_grad():
        plain = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["labels"],
                      image_sizes=batch["image_sizes"]).loss  # fmt: skip
        text = Collator(proc.pad_token_id)([dataset[16]])
        dummy = with_dummy_image(text, model.config, proc.pad_token_id)
        alone = model(text["input_ids"], attention_mask=text["attention_mask"], labels=text["labels"]).loss
        padded = model(dummy["input_ids"], dummy["pixel_values"], dummy["attention_mask"], dummy["labels"],
                       image_sizes=dummy["image_sizes"]).loss  # fmt: skip
    assert torch.isfinite(plain) and dummy["pixel_values"].dim() == 5
    assert torch.equal(alone, padded)  # the dummy image changes nothing


def test_short_run_trains_the_newline_with_the_projector(tiny, tmp_path):
    model_dir, data, images = tiny
    cfg = TrainConfig(
        model=str(model_dir), data=str(data), image_folder=str(images), output=str(tmp_path / "out"), lr=3e-3,
        warmup_ratio=0.0, batch_size=4, precision="fp32", progress=False, max_steps=6, group_by_length=True,
    )  # fmt: skip
    losses = train(cfg)["losses"]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    before, after = minillava.load(model_dir), minillava.load(tmp_path / "out")
    assert not torch.equal(before.image_newline, after.image_newline)
    assert load_processor(tmp_path / "out").image_config.mode == "anyres"
    assert "image_newline" in set_trainable(before, "pretrain")


def test_anyres_needs_its_settings(tiny):
    config = LlavaConfig.load(tiny[0])
    with pytest.raises(ValueError, match="grid_pinpoints"):
        LlavaConfig.from_dict({**config.to_dict(), "anyres": None})
    with pytest.raises(ValueError, match="not a multiple of the 28-pixel tile"):
        LlavaConfig.from_dict({**config.to_dict(), "anyres": {"grid_pinpoints": [[28, 50]]}})
    with pytest.raises(ValueError, match="class-token row"):
        LlavaConfig.from_dict({**config.to_dict(), "vision_feature_select_strategy": "full"})
    model = minillava.load(tiny[0])
    pixels = torch.zeros(1, 2, 3, 28, 28)
    with pytest.raises(ValueError, match=r"need \[3\] tiles but pixel_values holds 2"):
        model.encode_images(pixels, torch.tensor([[20, 20]]))
    with pytest.raises(ValueError, match="need both pixel_values"):
        model.encode_images(pixels)
    with pytest.raises(ValueError, match=r"positive \(height, width\), got \(0, 20\)"):
        model.encode_images(pixels, torch.tensor([[0, 20]]))
