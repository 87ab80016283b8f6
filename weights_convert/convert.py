"""Streaming conversion: one source file in memory at a time, shards written as they fill."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from minillava.checkpoint import DEFAULT_SHARD_BYTES, ShardWriter, atomic_directory, cast, check_state

from .keymaps import UnmappedKeyError


def list_keys(files: list[Path]) -> list[str]:
    keys = []
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys.extend(f.keys())
    return keys


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (OSError, RuntimeError) as err:
            raise OSError(f"{path}: cannot read ({err}); is the file truncated?") from None


def convert(
    source,
    dst: Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Write ``source`` (a layout object from ``hf_llava``/...) to ``dst`` in the minillava layout."""
    from minillava.checkpoint import build_empty

    config = source.config()
    expected = {k: v.shape for k, v in build_empty(config).state_dict().items()}
    keymap = source.keymap(list_keys(source.files))
    found: dict[str, torch.Size] = {}
    unmapped: list[str] = []
    with atomic_directory(dst, force=force) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        for path in source.files:
            if progress:
                progress(path.name)
            for their_key, tensor in iter_tensors([path]):
                try:
                    ours = keymap.to_ours(their_key)
                except UnmappedKeyError:
                    unmapped.append(their_key)
                    continue
                if ours is None or (ours == "llm.lm_head.weight" and config.text.tie_word_embeddings):
                    continue
                found[ours] = tensor.shape
                writer.add(ours, cast(tensor, dtype))
        if unmapped:
            raise ValueError(f"{source.directory}: no rule of layout {keymap.name!r} maps: {', '.join(unmapped)}")
        check_state(expected, found, str(source.directory))
        writer.close()
        config.save(tmp)
        for extra in source.carried_files():
            shutil.copy2(extra, tmp / extra.name)
