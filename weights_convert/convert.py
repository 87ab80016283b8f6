"""Write any checkpoint minillava reads into the minillava layout, one source file in memory at a time.

The source is read for its headers first and every name and shape is checked against the model its config
describes (:func:`minillava.layouts.source.plan`), so a bad checkpoint fails before a byte is written. Then each
source file is opened in turn and each tensor written straight to its precomputed place in the output shards:
memory holds one source file's pages and one tensor, never an output shard.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from minillava.checkpoint import carried_files
from minillava.config import LlavaConfig
from minillava.folders import atomic_directory
from minillava.layouts.reading import open_tensors
from minillava.layouts.source import Planned, Source, cast, cast_dtype, plan
from minillava.safetensors_io import DEFAULT_SHARD_BYTES, ProgressFn, write_shards


def _tensors(path: Path, planned: list[Planned], dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    with open_tensors(path) as get:
        for p in planned:
            yield p.ours, cast(get(p.theirs), p.target(dtype))


def convert(
    source: Source,
    dst: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    force: bool = False,
    progress: ProgressFn | None = None,
    allow_nonfinite: bool = False,
) -> LlavaConfig:
    """Write ``source`` to ``dst`` in the minillava layout, atomically, one source file in memory at a time.

    Args:
        source: from :func:`minillava.layouts.detect`.
        dst: destination directory; must not exist or be empty unless ``force``.
        dtype: cast floating weights (default: keep the source's dtype; a source may cast an auxiliary part, e.g.
            the original layout casts the CLIP tower to the LLaVA weights' dtype).
        max_shard_bytes: largest output shard.
        force: replace a non-empty ``dst``, only once the new checkpoint is complete. A ``dst`` that is, holds or
            lies inside a folder the source is read from is refused, ``force`` or not.
        progress: called as ``progress(i, n, path)`` before each source file.
        allow_nonfinite: write floating tensors holding NaN or infinite values (refused by default, naming them).
    """
    config = source.config()
    files = plan(source, config)
    entries = [
        (p.ours, p.meta.shape, cast_dtype(p.meta.dtype, p.target(dtype))) for _, planned in files for p in planned
    ]
    sources = [(path, functools.partial(_tensors, path, planned, dtype)) for path, planned in files]
    read_from = {source.directory, *(path.parent for path, _ in files)}
    with atomic_directory(dst, force=force, sources=read_from) as tmp:
        write_shards(tmp, entries, sources, max_shard_bytes, progress, allow_nonfinite)
        config.save(tmp)
        for extra in carried_files(source.directory):
            shutil.copy2(extra, tmp / extra.name)
    return config
