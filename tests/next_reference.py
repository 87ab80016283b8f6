"""Tiny random LLaVA-1.6 (LLaVA-NeXT) models as references: transformers' ``LlavaNextForConditionalGeneration``, and
the same weights written in original LLaVA's ``llava_mistral`` layout.

The original code (``llava-torch``) cannot be installed beside transformers 5, so its behaviour is reproduced with
transformers: given original LLaVA's ``(width, height)`` pinpoints read as ``(height, width)`` in the same order,
``LlavaNextForConditionalGeneration`` tiles, picks grids and lays features out exactly as the original does (pixels
bit-identical, logits within 2e-6, checked in the reference notes). The one rule left, the original's truncating
``unpad_image``, is put in with :func:`original_unpad`. Sizes are scaled down from LLaVA-1.6's: 28-pixel tiles of
7-pixel patches (a 4 x 4 patch grid per tile) and the released pinpoints divided by 12.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.hf_reference import (
    IMAGE_TOKEN_ID,
    VOCAB,
    original_config,
    original_state,
    round_to_fp16,
    save_hf,
    spread_weights,
)

TILE, PATCH = 28, 7
# transformers' LLaVA-1.6 pinpoints (height, width) / 12: 1x2, 2x1, 2x2, 3x1, 1x3 tiles.
PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
# Original LLaVA's released configs hold the same numbers, read as (width, height): a 1x2 canvas there is 2 tiles
# stacked, not side by side, which decides ties (images within one tile, 1-pixel strips).
ORIGINAL_PINPOINTS = PINPOINTS
REAL_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def next_config(
    text: str = "mistral",
    pinpoints: list[list[int]] | None = None,
    vision: dict[str, Any] | None = None,
    **text_options: Any,
):
    """A transformers ``LlavaNextConfig``: CLIP 3x32 at 28 px (``vision`` overrides its fields), a 2-layer Mistral
    (no sliding window) or LLaMA (``text_options`` override its fields)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, MistralConfig

    fields = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 1024,
        "pad_token_id": 0,
        **text_options,
    }
    if text == "mistral":
        text_config = MistralConfig(**fields, sliding_window=None, rope_theta=1e6)
    else:
        text_config = LlamaConfig(**fields)
    vision_fields = {
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "image_size": TILE,
        "patch_size": PATCH,
        "projection_dim": 16,
        **(vision or {}),
    }
    return LlavaNextConfig(
        text_config=text_config,
        vision_config=CLIPVisionConfig(**vision_fields),
        image_token_index=IMAGE_TOKEN_ID,
        image_grid_pinpoints=pinpoints or PINPOINTS,
    )


def make_next_model(seed: int = 0, fp16_values: bool = False, **options: Any):
    """``LlavaNextForConditionalGeneration`` with spread-out random weights (rounded to fp16 values if asked)."""
    from transformers import LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(next_config(**options)).eval()
    spread_weights(model, seed)
    with torch.no_grad():
        model.model.image_newline.mul_(5.0)  # spread_weights gives 1-D tensors 0.2 std; make the newline matter
    if fp16_values:
        round_to_fp16(model)
    return model


def tf_image_processor(tile: int = TILE, pinpoints: list[list[int]] | None = None):
    """transformers' PIL ``LlavaNextImageProcessor`` (named explicitly: torchvision's backend resamples differently)."""
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(
        size={"shortest_edge": tile},
        crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=pinpoints or PINPOINTS,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


def preprocessor_dict(tile: int = TILE, pinpoints: list[list[int]] | None = None) -> dict[str, Any]:
    """A llava-hf ``preprocessor_config.json`` for these tiles."""
    return {
        "image_processor_type": "LlavaNextImageProcessor",
        "image_grid_pinpoints": pinpoints or PINPOINTS,
        "size": {"shortest_edge": tile},
        "crop_size": {"height": tile, "width": tile},
        "resample": 3,
        "do_pad": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
    }


def save_next_hf(model, directory: Path, **save_options: Any) -> Path:
    """A llava-hf LLaVA-1.6 directory (weights, config, preprocessor config); ``layout="v4"`` as on the hub."""
    save_hf(model, directory, **save_options)
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor_dict()))
    return directory


def make_next_checkpoint(directory: Path, seed: int = 0) -> Path:
    """A random LLaVA-1.6 minillava checkpoint (28-px tiles, Mistral-style decoder, ``mistral_instruct``) with a
    real sentencepiece tokenizer (``<image>`` = ``VOCAB_SIZE``); returns its directory."""
    import minillava
    from minillava.config import AnyresConfig, ImageConfig, LlavaConfig, TextConfig, VisionConfig
    from minillava.model import Llava
    from tests.sp_fixtures import VOCAB_SIZE, write_tokenizer_dir

    tok = write_tokenizer_dir(directory.parent / f"{directory.name}-tokenizer")
    config = LlavaConfig(
        vision=VisionConfig(
            hidden_size=32, intermediate_size=48, num_layers=3, num_heads=2, image_size=TILE, patch_size=PATCH
        ),
        text=TextConfig(
            vocab_size=VOCAB_SIZE + 2, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
            num_kv_heads=2, rms_norm_eps=1e-5, pad_token_id=VOCAB_SIZE + 1, model_type="mistral",
        ),
        image_token_id=VOCAB_SIZE,
        image=ImageConfig(mode="anyres", shortest_edge=TILE, crop_size=TILE),
        chat_template="mistral_instruct",
        anyres=AnyresConfig(grid_pinpoints=PINPOINTS),
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Llava(config)
    spread_weights(model, seed)
    files = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
    minillava.save(model, directory, extra_files=[tok / name for name in files])
    return directory


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """Random noise over a colour gradient: every tile and every pixel of the resize differs."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, max(height, width))
    across, down = np.meshgrid(ramp[:width], ramp[:height])
    base = np.stack([across, down, np.full((height, width), 128.0)], -1)
    pixels = np.clip(base + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# --- original LLaVA (liuhaotian/llava-v1.6-*) built from a transformers model ------------------------------------


def original_next_config(model, **overrides: Any) -> dict[str, Any]:
    """A ``llava_mistral`` ``config.json``: the flat decoder fields plus the v1.6 ``mm_*`` and anyres ones."""
    v16 = {
        "architectures": ["LlavaMistralForCausalLM"],
        "model_type": "llava_mistral",
        "sliding_window": None,
        "image_aspect_ratio": "anyres",
        "image_grid_pinpoints": ORIGINAL_PINPOINTS,
        "image_crop_resolution": 224,
        "image_split_resolution": 224,
        "mm_patch_merge_type": "spatial_unpad",
        "tokenizer_model_max_length": 4096,
        "tokenizer_padding_side": "left",
        "unfreeze_mm_vision_tower": True,
    }
    return original_config(model, **{**v16, **overrides})


def save_original_next(model, directory: Path, **config_overrides: Any) -> Path:
    """An original-layout LLaVA-1.6 directory: fp16 safetensors with the tower inside, config, preprocessor. With
    ``mm_patch_merge_type="flat"`` the weights have no ``image_newline``, as the original builds none then."""
    directory.mkdir(parents=True, exist_ok=True)
    # The tuned tower inside, under model.vision_tower.vision_tower.vision_model.*; stale inv_freq buffers too.
    state, _ = original_state(model, tower_inside=True)
    if config_overrides.get("mm_patch_merge_type") == "flat":
        del state["model.image_newline"]
    state = {k: v if k.endswith("inv_freq") else v.half() for k, v in state.items()}
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(original_next_config(model, **config_overrides)))
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor_dict()))
    return directory


@contextlib.contextmanager
def original_unpad() -> Iterator[None]:
    """Within the block transformers' LLaVA-NeXT counts unpadded feature rows as original LLaVA does, ``int(x)``
    instead of ``int(round(x, 7))`` (``llava_arch.unpad_image``)."""
    from transformers.models.llava_next import modeling_llava_next

    def unpad(tensor: torch.Tensor, original_size) -> torch.Tensor:
        height, width = (int(x) for x in original_size)
        rows, cols = tensor.shape[1:]
        if width / height > cols / rows:
            pad = (rows - int(height * (cols / width))) // 2
            return tensor[:, pad : rows - pad, :]
        pad = (cols - int(width * (rows / height))) // 2
        return tensor[:, :, pad : cols - pad]

    saved = modeling_llava_next.unpad_image
    modeling_llava_next.unpad_image = unpad
    try:
        yield
    finally:
        modeling_llava_next.unpad_image = saved


def transposed(pinpoints: list[list[int]]) -> list[list[int]]:
    return [[b, a] for a, b in pinpoints]
