"""Shared fixtures: a real tokenizer, tiny checkpoints, images and the transformers reference, built once per run.

The builders live in plain helper modules (no test module imports another): :mod:`tests.sp_fixtures` (a
LLaMA-style sentencepiece tokenizer trained in the process and the slow-tokenizer reference),
:mod:`tests.hf_reference` (tiny random transformers LLaVA models, saved and converted the production way) and
:mod:`tests.tiny_models` (minillava checkpoints, images, LLaVA datasets). Session fixtures are files on disk that
tests only read.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.hf_reference import convert_hf, make_hf_model
from tests.sp_fixtures import write_tokenizer_dir
from tests.tiny_models import make_checkpoint, make_dataset, tiny_config, write_image


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A llava-hf style tokenizer directory: ``<image>`` and ``<pad>`` added after the vocabulary, legacy=false."""
    return write_tokenizer_dir(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def llava_config():
    """A fresh tiny ``LlavaConfig`` (see :func:`tests.tiny_models.tiny_config`) to edit freely."""
    return tiny_config()


@pytest.fixture(scope="session")
def chat_checkpoint(tmp_path_factory) -> Path:
    """A tiny checkpoint with spread weights that answers at some length: for generation and chat."""
    return make_checkpoint(tmp_path_factory.mktemp("chat") / "model", seed=1)


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> list[Path]:
    """Two PNGs of different sizes and colours."""
    d = tmp_path_factory.mktemp("images")
    return [write_image(d / "red.png", (200, 30, 30)), write_image(d / "blue.png", (20, 40, 220), (25, 50))]


@pytest.fixture(scope="session")
def train_setup(tmp_path_factory) -> tuple[Path, Path, Path]:
    """``(checkpoint, data file, image folder)``: a default-initialised tiny checkpoint (with a ``tokenizer.json``
    and a chat template file beside the weights) and 12 image + 4 text samples in LLaVA's JSON format."""
    root = tmp_path_factory.mktemp("train")
    model = make_checkpoint(root / "model", spread=False)
    # Files minillava does not read but carries for an export back to llava-hf.
    (model / "tokenizer.json").write_text('{"version": "1.0", "added_tokens": []}\n')
    (model / "chat_template.jinja").write_text("{% for message in messages %}{{ message.content }}{% endfor %}\n")
    return model, make_dataset(root), root / "images"


@pytest.fixture(scope="session")
def hf_reference(tmp_path_factory) -> Callable[..., tuple]:
    """``hf_reference(seed, **options) -> (transformers model, minillava model, converted directory)``: a tiny random
    transformers LLaVA with spread weights, saved as llava-hf, converted with ``python -m weights_convert`` and
    loaded with ``minillava.load`` (``options``: :func:`tests.hf_reference.hf_config`'s)."""

    def build(seed: int = 0, **options) -> tuple:
        hf = make_hf_model(seed=seed, **options)
        ours, dst = convert_hf(hf, tmp_path_factory.mktemp(f"hf-{seed}"))
        return hf, ours, dst

    return build


@pytest.fixture(scope="session")
def bundled_pipeline():
    """``Pipeline()``: the bundled shapes model, whose answers the server tests compare with (read-only: a test
    that hooks the model removes its hook)."""
    from minillava.pipeline import Pipeline

    return Pipeline()
