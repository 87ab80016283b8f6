"""Write any checkpoint minillava reads into the minillava layout, one source file in memory at a time.

The source is read for its headers first and every name and shape is checked against the model its config
describes (:func:`minillava.layouts.source.plan`), so a bad checkpoint fails before a byte is written. Then each
source file is opened in turn and each tensor written straight to its precomputed place in the output shards:
memory holds one source file's pages and one tensor, never an output shard.

The tokenizer is read before anything is written, too: a checkpoint whose tokenizer minillava cannot read would
only fail later, at its first prompt.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from minillava import quant
from minillava.checkpoint import carried_files
from minillava.config import LlavaConfig
from minillava.folders import atomic_directory
from minillava.layouts.reading import ConversionError, open_tensors
from minillava.layouts.source import Planned, Source, cast, cast_dtype, plan, quantized_tensors
from minillava.safetensors_io import DEFAULT_SHARD_BYTES, ProgressFn, write_shards


def _tensors(path: Path, planned: list[Planned], dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    with open_tensors(path) as get:
        for p in planned:
            yield p.ours, cast(get(p.theirs), p.target(dtype))


TOKENIZER_DEFINITION = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")
"""Files that say a directory has a tokenizer (a chat template or generation file alone does not)."""


def check_tokenizer(directory: Path) -> bool:
    """Read the tokenizer files of ``directory`` as generation will; returns whether there are any.

    Raises ``ConversionError`` (or ``MissingDependency`` for a ``tokenizer.json`` without the ``tokenizers``
    package) naming the fix when they cannot be read.
    """
    from minillava.tokenizer import Tokenizer

    if not any((directory / name).is_file() for name in TOKENIZER_DEFINITION):
        return False
    try:
        Tokenizer.from_dir(directory)
    except (ValueError, OSError) as err:
        raise ConversionError(
            f"the tokenizer cannot be read, so the converted model could not take prompts: {err}"
        ) from None
    return True


def convert(
    source: Source,
    dst: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    force: bool = False,
    progress: ProgressFn | None = None,
    allow_nonfinite: bool = False,
    quantize: str | None = None,
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
        quantize: ``"int8"`` or ``"int4"``: write the decoder's linear layers quantised (see
            :mod:`minillava.quant`); such a checkpoint loads without quantising again.
    """
    config = source.config()
    files = plan(source, config)
    check_tokenizer(source.directory)
    scheme = quant.resolve_scheme(config, quantize, str(source.directory))
    requantize = scheme is not None and not config.quantization  # a quantised source is copied as it is
    entries = []
    for _, planned in files:
        for p in planned:
            out_dtype = cast_dtype(p.meta.dtype, p.target(dtype))
            if requantize and quant.is_quantized_weight(p.ours):
                entries += quant.planned_entries(p.ours, p.meta.shape, out_dtype, scheme)
            else:
                entries.append((p.ours, p.meta.shape, out_dtype))
    if requantize:
        tensors = functools.partial(quantized_tensors, dtype=dtype, quantize=scheme)
        config = quant.recorded(config, scheme)
    else:
        tensors = functools.partial(_tensors, dtype=dtype)
    sources = [(path, functools.partial(tensors, path, planned)) for path, planned in files]
    read_from = {source.directory, *(path.parent for path, _ in files)}
    with atomic_directory(dst, force=force, sources=read_from) as tmp:
        write_shards(tmp, entries, sources, max_shard_bytes, progress, allow_nonfinite)
        config.save(tmp)
        for extra in carried_files(source.directory):
            shutil.copy2(extra, tmp / extra.name)
    return config
