"""Reading the weight files of a transformers-style directory: safetensors, or ``.bin`` pickles read safely.

A layout is first read for its tensors' names, shapes and dtypes only (safetensors headers; for a pickle, the
metadata of a memory-mapped, ``weights_only`` load), so that every name and shape is checked before any data
is read. Then one file at a time is opened for its tensors.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..safetensors_io import (
    INDEX_NAME,
    SINGLE_NAME,
    TensorMeta,
    open_safetensors,
    safetensors_files,
    safetensors_header,
)
from .keymaps import KeyMap

# torch.load(weights_only=True) can be escaped on torch < 2.6 (CVE-2025-32434) and corrupts memory on hostile input
# before 2.10 (CVE-2026-24747): older versions get no pickle at all.
MIN_TORCH_FOR_PICKLES = (2, 10)

PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
PICKLE_SINGLE_NAME = "pytorch_model.bin"


class ConversionError(ValueError):
    """A checkpoint minillava cannot or will not read as a LLaVA model; the message says why."""


@dataclass
class Part:
    """One source weight file and the key table that names its tensors."""

    path: Path
    keymap: KeyMap
    meta: dict[str, TensorMeta]
    dtype: torch.dtype | None = None  # floating tensors are cast to this unless the caller asks for a dtype


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a transformers-style directory, safetensors preferred, in index order."""
    if (directory / INDEX_NAME).is_file() or (directory / SINGLE_NAME).is_file():
        return safetensors_files(directory)
    if (directory / PICKLE_INDEX_NAME).is_file() or (directory / PICKLE_SINGLE_NAME).is_file():
        return safetensors_files(directory, PICKLE_INDEX_NAME, PICKLE_SINGLE_NAME)
    looked = ", ".join(f"{single}[.index.json]" for single in (SINGLE_NAME, PICKLE_SINGLE_NAME))
    raise FileNotFoundError(f"{directory}: no weight files (looked for {looked})")


def load_pickle_weights(path: Path) -> dict[str, torch.Tensor]:
    """A ``.bin`` state dict, memory-mapped, through torch's ``weights_only`` unpickler: tensors and plain
    containers only. A pickle that would call anything else is refused before it runs."""
    if tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2]) < MIN_TORCH_FOR_PICKLES:
        raise ConversionError(
            f"{path}: refusing to read a pickle with torch {torch.__version__}: weights_only loading is unsafe before "
            f"torch {'.'.join(map(str, MIN_TORCH_FOR_PICKLES))}; upgrade torch"
        )
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap can only be used" not in str(err):
                raise
            # Legacy (pre-zip) torch.save files cannot be mapped; they are still read with weights_only.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = re.search(r"WeightsUnpickler error: ([^\n]*?)(?: was not an allowed global| Please|\n|$)", str(err))
        detail = f" ({reason.group(1).strip()})" if reason else ""
        raise ConversionError(
            f"{path}: refused: the pickle asks to run something other than tensor loading{detail}; nothing was "
            "executed. Only load it if you trust its origin, and then re-save it as safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise OSError(f"{path}: cannot read this torch pickle ({first_line}); is the file truncated?") from None
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{path}: entries that are not named tensors: {', '.join(map(str, bad[:10]))}")
    return state


def read_meta(path: Path) -> dict[str, TensorMeta]:
    """Names, shapes and dtypes of a weight file, without reading its data."""
    if path.suffix == ".safetensors":
        return {name: meta for name, (meta, _) in safetensors_header(path).items()}
    state = load_pickle_weights(path)
    return {k: TensorMeta(tuple(v.shape), v.dtype) for k, v in state.items()}


@contextmanager
def open_tensors(path: Path, mapped: bool = False) -> Iterator[Callable[[str], torch.Tensor]]:
    """Yield a getter for the tensors of one weight file (see :func:`~minillava.safetensors_io.open_safetensors`).

    ``.bin`` pickles are always memory-mapped: their touched pages stay resident until the file's last tensor is
    released, so a conversion holds at most one ``.bin`` shard.
    """
    if path.suffix == ".safetensors":
        with open_safetensors(path, mapped) as get:
            yield get
        return
    state = load_pickle_weights(path)
    yield state.__getitem__
    del state
