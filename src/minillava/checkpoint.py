"""Checkpoint directories: :func:`load` any layout minillava reads, :func:`save` the minillava one, describe it.

The minillava layout is ``config.json`` + safetensors (sharded with an index when large) + the files carried
next to the weights (tokenizer, chat template, generation settings). Loading builds the model on the meta
device and hands it the tensors with ``load_state_dict(assign=True, strict=True)`` after checking every name and
shape (:mod:`minillava.layouts`), so RAM never holds the model twice and a bad checkpoint is named, not
half-loaded. Writing goes to a temporary directory that is renamed at the end.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from . import quant
from .chat import default_template_for
from .config import LlavaConfig
from .device import resolve_device
from .folders import atomic_directory
from .hub import resolve
from .layouts import detect, load_source
from .layouts.source import build_empty, cast, cast_dtype, plan
from .model import Llava
from .safetensors_io import (
    DEFAULT_SHARD_BYTES,
    dtype_name,
    weights_dtype,
    write_state,
)

CARRIED_FILES = (
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.json",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
)
"""Files that travel with the weights from one checkpoint directory to the next (conversion, training, export),
as they are. minillava reads the sentencepiece model and its JSON settings; ``tokenizer.json`` and the chat
template files are handed on so that an export back to llava-hf keeps them."""

TOKENIZER_FILES = tuple(name for name in CARRIED_FILES if name != "generation_config.json")


def carried_files(directory: str | os.PathLike) -> list[Path]:
    """The :data:`CARRIED_FILES` present in ``directory``."""
    directory = Path(directory)
    return [directory / name for name in CARRIED_FILES if (directory / name).is_file()]


def _source(path: str | os.PathLike, vision_tower: str | os.PathLike | None):
    """The layout reader of a checkpoint directory or hub id (and of the CLIP tower's, for original LLaVA)."""
    return detect(resolve(path), None if vision_tower is None else resolve(vision_tower))


def load_config(path: str | os.PathLike, vision_tower: str | os.PathLike | None = None) -> LlavaConfig:
    """The ``LlavaConfig`` of a checkpoint directory of any layout (or hub id), as :func:`load` builds the model
    from it (image settings, placeholder id, chat template and generation defaults included)."""
    return _source(path, vision_tower).config()


def weights_bytes(path: str | os.PathLike) -> int:
    """The size of a checkpoint directory's weight files (safetensors or ``.bin``), for messages."""
    directory = Path(path)
    return sum(p.stat().st_size for p in directory.iterdir() if p.suffix in (".safetensors", ".bin"))


def load(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    vision_tower: str | os.PathLike | None = None,
    quantize: str | None = None,
) -> Llava:
    """Load a checkpoint directory: minillava, or an unconverted llava-hf or original LLaVA one.

    Unconverted directories are mapped on the fly with the converter's key tables (no copy on disk); their
    tokenizer files stay where they are. Weights are memory-mapped and cast once, so RAM holds the model once.

    Args:
        path: a directory written by ``python -m weights_convert`` or :func:`minillava.save`, or a llava-hf /
            original LLaVA checkpoint directory, or a Hugging Face hub id such as ``llava-hf/llava-1.5-7b-hf``
            (:mod:`minillava.hub`).
        dtype: cast floating weights to this dtype (``torch.bfloat16`` or its name ``"bfloat16"``; default: keep
            the stored dtype).
        device: where the weights go: a torch device, or ``"auto"`` (:func:`minillava.device.resolve_device`).
        vision_tower: for an original LLaVA directory whose weights lack the vision tower, the CLIP checkpoint
            directory (or hub id) to take it from.
        quantize: ``"int8"`` or ``"int4"``: quantise the decoder's linear layers while loading (weight-only, see
            :mod:`minillava.quant`), a block of rows at a time, so memory never holds them in full precision. A
            checkpoint written quantised (``python -m weights_convert --quantize``) loads as it is.
    """
    return load_source(_source(path, vision_tower), weights_dtype(dtype), resolve_device(device), quantize)


def write_checkpoint(
    directory: Path,
    config: LlavaConfig,
    state: dict[str, torch.Tensor],
    carried_from: str | os.PathLike | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> None:
    """Write a minillava checkpoint into the (new, empty) ``directory``: ``config.json``, the weights one tensor at
    a time, and the :data:`CARRIED_FILES` found in ``carried_from``."""
    config.save(directory)
    write_state(directory, state, max_shard_bytes)
    if carried_from is not None:
        for path in carried_files(carried_from):
            shutil.copy2(path, directory / path.name)


def save(
    model: Llava,
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    force: bool = False,
    extra_files: Iterable[str | os.PathLike] = (),
) -> None:
    """Write ``model`` as a minillava checkpoint (config.json + safetensors), atomically.

    ``extra_files`` (tokenizer files and the like) are copied in beside the weights.
    """
    with atomic_directory(path, force=force) as tmp:
        state = {name: cast(tensor.detach(), dtype) for name, tensor in quant.checkpoint_tensors(model).items()}
        write_checkpoint(tmp, model.config, state, max_shard_bytes=max_shard_bytes)
        for extra in extra_files:
            shutil.copy2(extra, tmp / Path(extra).name)


def describe_checkpoint(path: str | os.PathLike, vision_tower: str | os.PathLike | None = None) -> dict:
    """What ``minillava info`` prints, for a checkpoint of any layout (or hub id), from its config and the weight
    files' headers (no weights are read; a ``.bin`` pickle is mapped for its tensors' shapes)."""
    source = _source(path, vision_tower)
    path = source.directory
    config = source.config()
    parts = {"vision": 0, "projector": 0, "llm": 0}
    dtypes: dict[str, int] = {}
    for _, planned in plan(source, config):
        for p in planned:
            part, dtype = p.ours.split(".", 1)[0], dtype_name(cast_dtype(p.meta.dtype, p.target(None)))
            parts[part] = parts.get(part, 0) + p.meta.numel
            dtypes[dtype] = dtypes.get(dtype, 0) + p.meta.numel
    if quant.stored_scheme(config, str(path)):
        # Parameters as the full-precision model counts them (not bytes of codes, nor the scales).
        full = build_empty(dataclasses.replace(config, quantization=None)).state_dict()
        parts = {part: sum(t.numel() for k, t in full.items() if k.startswith(f"{part}.")) for part in parts}
    t, v = config.text, config.vision
    return {
        "path": str(path),
        "layout": config.source_layout or "minillava",
        "parameters": {**parts, "total": sum(parts.values())},
        "dtype": ", ".join(sorted(dtypes, key=dtypes.get, reverse=True)),
        "quantization": config.quantization,
        "decoder": f"{t.num_layers} layers, hidden {t.hidden_size}, {t.num_heads} heads ({t.num_kv_heads} kv), "
        f"head_dim {t.head_dim}, mlp {t.intermediate_size}, vocabulary {t.vocab_size}",
        "vision": f"CLIP {v.num_layers} layers, hidden {v.hidden_size}, patch {v.patch_size}; feature layer "
        f"{config.vision_feature_layer} ({config.vision_feature_select_strategy}); projector {config.projector_type}",
        "context_length": t.max_position_embeddings,
        "image_size": v.image_size,
        "image_mode": config.image.mode,
        "tokens_per_image": config.num_image_tokens,
        "image_token_id": config.image_token_id,
        "anyres": None if config.anyres is None else dataclasses.asdict(config.anyres),
        "template": config.chat_template or default_template_for(path.resolve(), config.source_layout),
        "eos_token_id": t.eos_token_id,
    }
