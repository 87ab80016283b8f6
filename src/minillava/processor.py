"""The processor: prompt text and images in, ``input_ids``, ``attention_mask`` and ``pixel_values`` out.

>>> proc = load_processor("path/to/converted")
>>> text = proc.format_chat([{"role": "user", "content": "<image>\\nWhat is shown?"}])
>>> batch = proc(text, images=["photo.jpg"])
>>> batch["input_ids"].shape, batch["pixel_values"].shape
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .anyres import num_features
from .chat import ChatTemplate, default_template_for, get_template
from .checkpoint import load_config
from .config import IMAGE_MODES, AnyresConfig, ImageConfig
from .hub import resolve
from .image import (
    DEFAULT_MAX_PIXELS,
    SINGLE_IMAGE_TYPES,
    ImageInput,
    anyres_pixel_values,
    check_image_count,
    describe,
    image_list,
    load_image,
    pad_tiles,
    pixel_values,
)
from .tokenizer import IMAGE_MARKER, IncrementalDecoder, Tokenizer, pad_batch


class Processor:
    """Tokenizer, image preprocessing and chat template of one checkpoint.

    Attributes:
        tokenizer: the :class:`~minillava.tokenizer.Tokenizer`.
        image_config: the :class:`~minillava.config.ImageConfig` (mode, sizes, mean/std).
        template: the default :class:`~minillava.chat.ChatTemplate`.
        image_token_id: the placeholder id; each ``<image>`` becomes :meth:`image_tokens` of them.
        num_image_tokens: ``K``, the rows the projector emits per image (per tile for anyres images).
        anyres: the LLaVA-1.6 settings (``None`` for LLaVA-1.5 models); used when ``image_config.mode`` is
            ``anyres``, with ``patch_size`` (the tower's) to count each image's placeholders.
        pad_token_id: the id padding positions get (the tokenizer's pad token, else the config's, else unk).
        max_pixels: the pixel limit for images (``None``: none).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_config: ImageConfig,
        *,
        image_token_id: int,
        num_image_tokens: int,
        template: str | ChatTemplate = "llava_v1",
        pad_token_id: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        anyres: AnyresConfig | None = None,
        patch_size: int | None = None,
    ) -> None:
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be at least 1, got {num_image_tokens}")
        if image_config.mode == "anyres" and (anyres is None or patch_size is None):
            raise ValueError("image mode 'anyres' needs the model's anyres settings and patch_size")
        self.anyres = anyres
        self.patch_size = patch_size
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.template = get_template(template)
        self.image_token_id = int(image_token_id)
        self.num_image_tokens = int(num_image_tokens)
        self.max_pixels = max_pixels
        for candidate in (tokenizer.pad_token_id, pad_token_id, tokenizer.unk_token_id):
            if candidate is not None:
                self.pad_token_id = int(candidate)
                break
        else:
            raise ValueError("no pad id: the tokenizer has neither a pad nor an unk token; pass pad_token_id")
        marker_id = tokenizer.token_to_id(IMAGE_MARKER)
        if marker_id is not None and marker_id != self.image_token_id:
            raise ValueError(
                f"config.json says image_token_id {self.image_token_id} but the tokenizer ({tokenizer.source}) has "
                f"{IMAGE_MARKER} = {marker_id}; the checkpoint's config and tokenizer files disagree"
            )
        if marker_id is None:
            if self.image_token_id < len(tokenizer):
                raise ValueError(
                    f"image_token_id {self.image_token_id} is an ordinary token of the tokenizer ({tokenizer.source}) "
                    "and text could produce it; check config.json against the tokenizer files"
                )
            # Original-layout checkpoints: the placeholder lives past the tokenizer's vocabulary.
            tokenizer.add_special_id(self.image_token_id, IMAGE_MARKER)

    def format_chat(
        self,
        messages: Sequence[Mapping[str, str]],
        template: str | ChatTemplate | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """:func:`~minillava.chat.format_chat` with this checkpoint's template as the default."""
        return get_template(template or self.template).format(messages, add_generation_prompt)

    def image_tokens(self, height: int, width: int) -> int:
        """Placeholders one ``<image>`` of ``height`` x ``width`` pixels expands to: ``num_image_tokens``, or for an
        anyres image its tiles' rows after the merge (see :func:`minillava.anyres.num_features`)."""
        if self.image_config.mode != "anyres":
            return self.num_image_tokens
        tile = self.image_config.crop_size
        return num_features(
            height,
            width,
            pinpoints=self.anyres.grid_pinpoints,
            tile=tile,
            side=tile // self.patch_size,
            rows_per_tile=self.num_image_tokens,
            merge=self.anyres.merge,
            rounding=self.anyres.unpad_rounding,
        )

    def encode(self, text: str, image_tokens: Sequence[int] | None = None) -> list[int]:
        """Ids of one prompt, each ``<image>`` expanded to its placeholders: ``image_tokens[i]`` for the i-th
        (from :meth:`image_tokens`), or ``num_image_tokens`` for every one when not given."""
        if not isinstance(text, str):
            raise ValueError(f"a prompt must be a str, got {type(text).__name__}")
        if not text.strip():
            raise ValueError("empty prompt")
        counts = self.num_image_tokens if image_tokens is None else image_tokens
        ids = self.tokenizer.encode(text, counts, self.image_token_id)
        cap = self.anyres.max_sequence_length if self.anyres is not None else None
        if cap is not None and len(ids) > cap:
            raise ValueError(
                f"the prompt is {len(ids)} tokens with its image rows, over this checkpoint's {cap}: original LLaVA "
                f"cuts the sequence there (tokenizer_model_max_length) and silently drops the rest, text included; "
                "use fewer or smaller images or a shorter prompt"
            )
        return ids

    def images(self, images: Sequence[ImageInput]) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
        """Load and preprocess images: ``(pixel_values, image_sizes, placeholder counts)``.

        ``pixel_values`` is ``[N, 3, S, S]``, or ``[N, max_tiles, 3, S, S]`` in anyres mode, where ``image_sizes``
        is ``[N, 2]`` (height, width); otherwise ``image_sizes`` is ``None``. ``N`` must be at least 1.
        """
        names = [describe(img) if len(images) == 1 else f"image {i} ({describe(img)})" for i, img in enumerate(images)]
        loaded = [(load_image(img, self.max_pixels, name), name) for img, name in zip(images, names, strict=True)]
        counts = [self.image_tokens(img.height, img.width) for img, _ in loaded]
        if self.image_config.mode != "anyres":
            pixels = [pixel_values(img, self.image_config, self.max_pixels, n) for img, n in loaded]
            return torch.stack(pixels), None, counts
        pinpoints = self.anyres.grid_pinpoints
        stacks = [anyres_pixel_values(img, self.image_config, pinpoints, self.max_pixels, n) for img, n in loaded]
        sizes = torch.tensor([(img.height, img.width) for img, _ in loaded], dtype=torch.int64)
        return pad_tiles(stacks), sizes, counts

    def __call__(
        self,
        text: str | Sequence[str],
        images: ImageInput | Sequence[ImageInput] | Sequence[Sequence[ImageInput]] | None = None,
        padding_side: str = "left",
    ) -> dict[str, torch.Tensor | None]:
        """Tokenize prompts and preprocess their images.

        Args:
            text: one prompt, or a list of prompts (a batch).
            images: for one prompt, its images in ``<image>`` order (a list, or a single image); for a batch, one
                list per prompt. Paths, ``pathlib.Path``, raw bytes or ``PIL.Image`` objects.
            padding_side: ``"left"`` (generation) or ``"right"`` (training).

        Returns:
            ``input_ids`` and ``attention_mask`` (int64 ``[B, L]``, mask 1 on real tokens) and ``pixel_values``
            (float32 ``[N, 3, S, S]``, all images of the batch in order, or ``None`` when there are none). In anyres
            mode (LLaVA-1.6) ``pixel_values`` is ``[N, max_tiles, 3, S, S]`` and ``image_sizes`` (int64 ``[N, 2]``,
            height and width, ``None`` without images) comes with it: transformers' ``LlavaNextProcessor`` layout.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        batched = not isinstance(text, str)
        texts = list(text) if batched else [text]
        if not texts:
            raise ValueError("empty batch: no prompts given")
        per_text = self._group_images(texts, images, batched)
        wheres = [f"prompt {i}: " if batched else "" for i in range(len(texts))]
        for where, prompt, imgs in zip(wheres, texts, per_text, strict=True):
            if not isinstance(prompt, str):
                raise ValueError(f"{where}a prompt must be a str, got {type(prompt).__name__}")
            check_image_count(prompt.count(IMAGE_MARKER), len(imgs), where)
        flat = [img for imgs in per_text for img in imgs]
        # Images first: an anyres image's placeholder count depends on its size.
        pixels, sizes, counts = self.images(flat) if flat else (None, None, [])
        ids = []
        first = 0
        for where, prompt, imgs in zip(wheres, texts, per_text, strict=True):
            try:
                ids.append(self.encode(prompt, counts[first : first + len(imgs)]))
            except ValueError as err:
                raise ValueError(f"{where}{err}") from None
            first += len(imgs)
        input_ids, attention_mask = pad_batch(ids, self.pad_token_id, padding_side)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixels}
        if self.image_config.mode == "anyres":
            batch["image_sizes"] = sizes
        return batch

    @staticmethod
    def _group_images(texts: list[str], images: object, batched: bool) -> list[list[ImageInput]]:
        if images is None:
            return [[] for _ in texts]
        if not batched:
            return [image_list(images)]
        if isinstance(images, SINGLE_IMAGE_TYPES) or not isinstance(images, Sequence):
            raise ValueError("for a batch of prompts pass images as a list with one list of images per prompt")
        if len(images) != len(texts):
            raise ValueError(
                f"{len(texts)} prompts but {len(images)} image lists; pass one list per prompt (empty for none)"
            )
        groups = []
        for i, group in enumerate(images):
            if group is None:
                groups.append([])
            elif isinstance(group, SINGLE_IMAGE_TYPES):
                raise ValueError(f"images[{i}] must be a list of images for prompt {i}, got a single image")
            else:
                groups.append(list(group))
        return groups

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of one id sequence (special tokens and image placeholders dropped unless asked to keep them)."""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, ids: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
        """:meth:`decode` for each row."""
        return [self.decode(row, skip_special_tokens) for row in ids]

    def incremental_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        """A streaming decoder; see :class:`~minillava.tokenizer.IncrementalDecoder`."""
        return self.tokenizer.incremental_decoder(skip_special_tokens)

    def training_example(self, messages, images=None, template=None, sample_id=None, **options) -> dict:
        """``input_ids``, ``labels`` (only assistant turns and their end-of-turn token supervised) and
        ``pixel_values`` for one conversation; see :func:`minillava.labels.training_example`."""
        from .labels import training_example

        return training_example(self, messages, images, template=template, sample_id=sample_id, **options)


def load_processor(
    path: str | os.PathLike,
    image_mode: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    template: str | None = None,
    vision_tower: str | os.PathLike | None = None,
) -> Processor:
    """The processor of a checkpoint directory.

    Args:
        path: a directory with ``config.json`` and the tokenizer files (``tokenizer.model`` or ``tokenizer.json``,
            ``tokenizer_config.json``, ...): converted, or an unconverted llava-hf / original LLaVA directory, or a
            Hugging Face hub id (:mod:`minillava.hub`).
        image_mode: ``"crop"``, ``"pad"`` or ``"anyres"`` (LLaVA-1.6 checkpoints) to override the checkpoint's
            preprocessing.
        max_pixels: refuse images with more pixels than this (``None``: no limit).
        template: a chat template name to use instead of the checkpoint's default.
        vision_tower: for an unconverted original LLaVA directory, the CLIP directory (as for ``minillava.load``).
    """
    path = resolve(path)
    config = load_config(path, vision_tower)
    image_config = config.image
    if image_mode is not None:
        if image_mode not in IMAGE_MODES:
            raise ValueError(f"image_mode must be one of {', '.join(IMAGE_MODES)}, got {image_mode!r}")
        if image_mode == "anyres" and config.anyres is None:
            raise ValueError(f"{path}: image_mode 'anyres' needs a LLaVA-1.6 checkpoint (it has no grid_pinpoints)")
        image_config = dataclasses.replace(image_config, mode=image_mode)
    if template is None:
        template = config.chat_template or default_template_for(Path(path).resolve(), config.source_layout)
    return Processor(
        Tokenizer.from_dir(path),
        image_config,
        image_token_id=config.image_token_id,
        num_image_tokens=config.num_image_tokens,
        template=template,
        pad_token_id=config.text.pad_token_id,
        max_pixels=max_pixels,
        anyres=config.anyres,
        patch_size=config.vision.patch_size,
    )
