"""Tiny minillava checkpoints with a real tokenizer, PNG files and LLaVA-format datasets, built in the test.

Nothing here downloads anything: the tokenizer is trained in the process (:mod:`tests.sp_fixtures`), the weights
are random, the images are drawn with Pillow. ``conftest.py`` turns these into fixtures; modules that need a
variant call the builders directly.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from PIL import Image

import minillava
from minillava.checkpoint import carried_files
from minillava.config import ImageConfig, LlavaConfig, TextConfig, VisionConfig
from minillava.model import Llava
from minillava.train import TrainConfig
from tests.hf_reference import spread_weights
from tests.sp_fixtures import VOCAB_SIZE, write_tokenizer_dir

IMAGE_ID = VOCAB_SIZE  # write_tokenizer_dir adds <image> = VOCAB_SIZE, <pad> = VOCAB_SIZE + 1
PAD_ID = VOCAB_SIZE + 1
EOS_ID = 2
COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


def tiny_config(template: str = "vicuna_v1") -> LlavaConfig:
    """CLIP 3x32 at 28 px (16 patches of 7 px), LLaMA 2x64 with grouped-query attention, context 512, pad mode.

    The vocabulary has 30 spare rows past the tokenizer's (as padded embeddings do), never produced by text.
    """
    return LlavaConfig(
        vision=VisionConfig(
            hidden_size=32, intermediate_size=48, num_layers=3, num_heads=2, image_size=28, patch_size=7
        ),
        text=TextConfig(
            vocab_size=VOCAB_SIZE + 32,
            hidden_size=64,
            intermediate_size=96,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            rms_norm_eps=1e-5,
            max_position_embeddings=512,
            pad_token_id=PAD_ID,
        ),
        image_token_id=IMAGE_ID,
        image=ImageConfig(mode="pad", shortest_edge=28, crop_size=28),
        chat_template=template,
    )


def make_checkpoint(dst: Path, seed: int = 0, template: str = "vicuna_v1", spread: bool = True) -> Path:
    """A tiny random minillava checkpoint at ``dst`` with its tokenizer files, written like a converted one.

    ``spread=True`` re-draws the weights with a large spread (far from uniform logits) and gives EOS a zero logit
    row among large ones, so that greedy answers have some length: for generation. ``spread=False`` keeps the
    default initialisation, which training starts from.
    """
    torch.manual_seed(seed)
    model = Llava(tiny_config(template)).eval()
    if spread:
        spread_weights(model, seed)
        with torch.no_grad():
            model.llm.lm_head.weight[EOS_ID] = 0.0
    tokenizer = write_tokenizer_dir(dst.parent / f"{dst.name}-tokenizer")
    minillava.save(model, dst, extra_files=carried_files(tokenizer))
    return dst


def write_image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> Path:
    """A plain-coloured PNG."""
    Image.new("RGB", size, color).save(path)
    return path


def make_dataset(root: Path, n_image: int = 12, n_text: int = 4, seed: int = 0, name: str = "data.json") -> Path:
    """Coloured pictures with "what colour?" questions, plus two-turn text-only samples; images under root/images."""
    rng = random.Random(seed)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n_image):
        color = rng.choice(list(COLORS))
        write_image(images / f"{i}.png", COLORS[color], (28 + i % 5, 28))
        records.append(
            {
                "id": f"img{i}",
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "What color is the picture?\n<image>"},
                    {"from": "gpt", "value": f"The picture is {color}."},
                ],
            }
        )
    for i in range(n_text):
        records.append(
            {
                "id": f"txt{i}",
                "conversations": [
                    {"from": "human", "value": "Describe a street."},
                    {"from": "gpt", "value": "A man is standing on the street."},
                    {"from": "human", "value": "Where is the tree?"},
                    {"from": "gpt", "value": "At the top left."},
                ],
            }
        )
    rng.shuffle(records)
    path = root / name
    path.write_text(json.dumps(records))
    return path


def train_config(setup: tuple[Path, Path, Path], output: Path, **overrides) -> TrainConfig:
    """A short fp32 run of ``setup`` = ``(checkpoint, data file, image folder)`` into ``output``: batch 4, constant
    lr 3e-3 (no warmup), no progress line; ``overrides`` set any other field."""
    model, data, images = setup
    base = {
        "model": str(model),
        "data": str(data),
        "image_folder": str(images),
        "output": str(output),
        "lr": 3e-3,
        "warmup_ratio": 0.0,
        "batch_size": 4,
        "precision": "fp32",
        "progress": False,
    }
    return TrainConfig(**{**base, **overrides})


def read_log(output: Path) -> list[dict]:
    """The records of a run's ``log.jsonl``."""
    return [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
