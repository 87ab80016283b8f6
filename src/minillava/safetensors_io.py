"""Tensors on disk: safetensors headers and reading, a streaming shard writer, atomic directories, dtype names.

Every checkpoint minillava reads or writes goes through here: the loader, the converter, the exporter and the
trainer. Reading never holds more than one tensor that it did not memory-map; writing lays out every shard up
front and puts each tensor at its offset the moment it arrives, so no output shard is ever held in memory.
Nothing is written in place: a checkpoint is built in a temporary directory beside its destination and renamed
when complete (:mod:`minillava.folders`).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .config import DTYPE_NAMES, read_json

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_SHARD_BYTES = 2 * 1024**3
MAX_HEADER_BYTES = 100 * 10**6  # safetensors' own limit

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
"""The dtypes weights can be cast to, by the names the command lines take."""

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
DTYPE_FROM_SAFETENSORS = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}

ProgressFn = Callable[[int, int, Path], None]
"""Called as ``progress(i, n, path)`` before each of ``n`` source files, and once more with ``i == n``."""


class UnsupportedDtype(ValueError):
    """A safetensors file holds a dtype torch cannot represent here."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (what config files and messages call it)."""
    return str(dtype).removeprefix("torch.")


def weights_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The dtype to cast weights to: ``None`` (keep theirs), a floating ``torch.dtype`` or its name (``"bfloat16"``).

    Integer and float8 dtypes are refused: the model computes in its weights' dtype.
    """
    if dtype is None:
        return None
    if isinstance(dtype, str):
        found = DTYPES.get(dtype)
    else:
        found = dtype if isinstance(dtype, torch.dtype) and dtype in (*DTYPES.values(), torch.float64) else None
    if found is None:
        raise ValueError(
            f"dtype {dtype!r}: weights need a floating dtype the model computes in: float32, bfloat16 or float16 "
            "(a torch.dtype or its name)"
        )
    return found


def check_finite(name: str, tensor: torch.Tensor, where: Path) -> None:
    """Raise ``ValueError`` naming the tensor when a floating ``tensor`` holds NaN or infinite values."""
    if not tensor.dtype.is_floating_point:
        return
    # NaN and infinities carry into a sum, so a finite sum clears the tensor in one pass at memory speed (isfinite()
    # is ten times slower). A sum can also overflow: a non-finite one is confirmed by counting.
    flat = tensor.reshape(-1)
    if bool(flat.sum().isfinite()):
        return
    nan, inf = int(flat.isnan().sum()), int(flat.isinf().sum())
    if nan or inf:
        raise ValueError(
            f"{where}: tensor {name} holds {nan} NaN and {inf} infinite value(s) (as {dtype_name(tensor.dtype)}); "
            "the checkpoint is damaged, or the cast overflowed. Pass allow_nonfinite=True (--allow-nonfinite) to "
            "write it anyway"
        )


@dataclass(frozen=True)
class TensorMeta:
    """A tensor's shape and dtype, known from a header before any data is read."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


# --- reading ---------------------------------------------------------------------------------------------------


def safetensors_files(
    directory: str | os.PathLike, index_name: str = INDEX_NAME, single_name: str = SINGLE_NAME
) -> list[Path]:
    """The weight files of a directory: ``model.safetensors``, or the shards its index names (in index order).

    The same index format serves ``.bin`` shards (``pytorch_model.bin.index.json``) given their names.
    """
    directory = Path(directory)
    index = directory / index_name
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no 'weight_map'; the index is damaged")
        for tensor, name in weight_map.items():
            if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
                raise ValueError(
                    f"{index}: tensor {tensor!r} maps to {name!r}, not a file name in {directory}; the index is damaged"
                )
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{index} names shard(s) missing from {directory}: {', '.join(missing)}; copy or download them again"
            )
        return files
    if (directory / single_name).is_file():
        return [directory / single_name]
    raise FileNotFoundError(f"{directory}: no {single_name} or {index_name}")


def safetensors_header(path: Path) -> dict[str, tuple[TensorMeta, int]]:
    """``{name: (meta, absolute byte offset)}`` from a safetensors file's header, checked as safetensors checks it.

    Every tensor has a known dtype, a shape of non-negative sizes and as many bytes as shape x dtype; together the
    tensors cover the data exactly: no overlap, no gap, nothing past the end of the file and nothing after the
    last tensor. A damaged file is refused here, before any reader trusts its offsets.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < length <= min(size - 8, MAX_HEADER_BYTES):
            raise OSError(f"{path}: not a safetensors file, or truncated (header length {length}, file {size} bytes)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise OSError(f"{path}: the safetensors header is not valid JSON; is the file damaged?") from None
    if not isinstance(header, dict):
        raise OSError(f"{path}: the safetensors header is not a JSON object; is the file damaged?")
    start = 8 + length
    entries = {}
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        meta, begin, end = _header_entry(path, name, info)
        if start + end > size:
            raise OSError(
                f"{path}: tensor {name} ends at byte {start + end} but the file has {size} bytes; is it truncated?"
            )
        entries[name] = (meta, start + begin)
        spans.append((begin, end, name))
    covered, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin < covered:
            raise OSError(f"{path}: tensors {previous} and {name} overlap in the data; the file is damaged")
        if begin > covered:
            raise OSError(f"{path}: no tensor holds bytes {covered} to {begin} of the data; the file is damaged")
        covered, previous = end, name
    if start + covered < size:
        raise OSError(f"{path}: {size - start - covered} bytes after the last tensor; the file is damaged")
    return entries


def _header_entry(path: Path, name: str, info: Any) -> tuple[TensorMeta, int, int]:
    """One tensor's entry of a safetensors header: ``(meta, begin, end)`` within the data, checked."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise OSError(f"{path}: malformed header entry for tensor {name} ({info!r}); is the file damaged?")
    dtype = DTYPE_FROM_SAFETENSORS.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise UnsupportedDtype(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
        raise OSError(f"{path}: tensor {name} has shape {shape}; the file is damaged")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_size(x) for x in offsets):
        raise OSError(f"{path}: tensor {name} has data offsets {offsets}; the file is damaged")
    meta = TensorMeta(tuple(shape), dtype)
    begin, end = offsets
    if end - begin != meta.nbytes:
        raise OSError(
            f"{path}: tensor {name} has data offsets {offsets}, {end - begin} bytes for shape {list(meta.shape)} "
            f"{dtype_name(dtype)} ({meta.nbytes} bytes); the file is damaged"
        )
    return meta, begin, end


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def iter_safetensors(files: Iterable[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from safetensors files, one memory-mapped tensor at a time."""
    for path in files:
        with open_safetensors(path, mapped=True) as get:
            for name in get.names:
                yield name, get(name)


class _Getter:
    """``get(name)`` returns a tensor; ``get.names`` lists the file's tensors; ``get.rows(name, start, stop)`` gives
    rows ``start:stop`` of one (read alone from an unmapped file, so a large weight need not be held whole)."""

    def __init__(
        self,
        read: Callable[[str], torch.Tensor],
        names: list[str],
        rows: Callable[[str, int, int], torch.Tensor] | None = None,
    ) -> None:
        self.read, self.names = read, names
        self.rows = rows or (lambda name, start, stop: read(name)[start:stop])

    def __call__(self, name: str) -> torch.Tensor:
        return self.read(name)


@contextmanager
def open_safetensors(path: Path, mapped: bool = False) -> Iterator[Callable[[str], torch.Tensor]]:
    """Yield a getter for the tensors of one safetensors file.

    ``mapped=True`` (loading) returns memory-mapped tensors that stay valid after the file is closed.
    ``mapped=False`` (conversion) reads each tensor into its own buffer, so memory holds one tensor at a time
    whatever the shard size, and the header is checked against the file's length first.
    """
    if mapped:
        safetensors_header(path)  # the same checks as below, with messages that name the damage
        try:
            opened = safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError, RuntimeError) as err:
            if isinstance(err, FileNotFoundError):
                raise
            raise OSError(f"{path}: cannot read safetensors file ({err}); is it truncated?") from None
        with opened as f:
            yield _Getter(f.get_tensor, list(f.keys()))
        return
    entries = safetensors_header(path)
    with open(path, "rb") as f:

        def read_bytes(name: str, skip: int, shape: tuple[int, ...]) -> torch.Tensor:
            meta, offset = entries[name]
            n = TensorMeta(shape, meta.dtype).nbytes
            if n == 0:
                return torch.empty(shape, dtype=meta.dtype)
            buffer = bytearray(n)
            f.seek(offset + skip)
            if f.readinto(buffer) != n:
                raise OSError(f"{path}: tensor {name} is cut short; is the file truncated?")
            return torch.frombuffer(buffer, dtype=meta.dtype).reshape(shape)

        def read(name: str) -> torch.Tensor:
            return read_bytes(name, 0, entries[name][0].shape)

        def rows(name: str, start: int, stop: int) -> torch.Tensor:
            meta = entries[name][0]
            row = TensorMeta(meta.shape[1:], meta.dtype).nbytes
            return read_bytes(name, start * row, (stop - start, *meta.shape[1:]))

        yield _Getter(read, list(entries), rows)


# --- writing ---------------------------------------------------------------------------------------------------


class ShardWriter:
    """Safetensors shards whose layout is fixed up front, so each tensor is written the moment it arrives.

    ``entries`` (name, shape, dtype) are cut into shards of at most ``max_shard_bytes`` in the given order. Every
    shard file gets its header and full length at once; :meth:`write` puts a tensor's bytes at its offset. Nothing
    is buffered, unlike ``safetensors.save_file``, which needs (and copies) a whole shard in memory.
    """

    def __init__(
        self,
        directory: Path,
        entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        base: str = "model",
    ) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        shards: list[list[tuple[str, TensorMeta]]] = [[]]
        size = 0
        for name, shape, dtype in entries:
            meta = TensorMeta(tuple(shape), dtype)
            if shards[-1] and size + meta.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, meta))
            size += meta.nbytes
        n = len(shards)
        names = [f"{base}.safetensors"] if n == 1 else [f"{base}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.files = [directory / name for name in names]
        self.index_path = None if n == 1 else directory / f"{base}.safetensors.index.json"
        self.slots: dict[str, tuple[Path, int, TensorMeta]] = {}
        self.total_bytes = 0
        for path, shard in zip(self.files, shards, strict=True):
            self._lay_out(path, shard)
        self.written: set[str] = set()

    def _lay_out(self, path: Path, shard: list[tuple[str, TensorMeta]]) -> None:
        # Widest dtypes first keeps every tensor aligned to its element size, as safetensors' own writer does.
        ordered = sorted(shard, key=lambda item: -item[1].dtype.itemsize)
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, meta in ordered:
            header[name] = {
                "dtype": SAFETENSORS_DTYPES[meta.dtype],
                "shape": list(meta.shape),
                "data_offsets": [offset, offset + meta.nbytes],
            }
            offset += meta.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        start = 8 + len(blob)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            f.truncate(start + offset)
        for name, meta in ordered:
            self.slots[name] = (path, start + header[name]["data_offsets"][0], meta)
        self.total_bytes += offset

    def write(self, name: str, tensor: torch.Tensor) -> None:
        path, offset, meta = self.slots[name]
        if tuple(tensor.shape) != meta.shape or tensor.dtype != meta.dtype:
            raise ValueError(
                f"{name}: got {list(tensor.shape)} {tensor.dtype}, planned {list(meta.shape)} {meta.dtype}"
            )
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(memoryview(data))
        self.written.add(name)

    def close(self) -> None:
        """Check that every planned tensor was written and write the index for a sharded checkpoint."""
        missing = sorted(set(self.slots) - self.written)
        if missing:
            raise ValueError(f"tensors planned but never written: {', '.join(missing)}")
        if self.index_path is not None:
            weight_map = {name: path.name for name, (path, _, _) in self.slots.items()}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            self.index_path.write_text(json.dumps(index, indent=2) + "\n")


def write_shards(
    directory: Path,
    entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
    sources: Sequence[tuple[Path, Callable[[], Iterable[tuple[str, torch.Tensor]]]]],
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: ProgressFn | None = None,
    allow_nonfinite: bool = False,
    base: str = "model",
) -> None:
    """Write the planned ``entries`` from ``sources``, one source file at a time.

    Each source is ``(path, tensors)``: calling ``tensors()`` opens that file and yields ``(output name, tensor)``
    pairs, each written at once and then dropped. A floating tensor holding NaN or infinite values is refused,
    naming it and its source, unless ``allow_nonfinite``. Files are named ``{base}.safetensors`` (or shards).
    """
    writer = ShardWriter(directory, entries, max_shard_bytes, base)
    for i, (path, tensors) in enumerate(sources):
        if progress:
            progress(i, len(sources), path)
        for name, tensor in tensors():
            if not allow_nonfinite:
                check_finite(name, tensor, path)
            writer.write(name, tensor)
    if progress and sources:
        progress(len(sources), len(sources), sources[-1][0])
    writer.close()


def write_state(
    directory: Path, state: dict[str, torch.Tensor], max_shard_bytes: int = DEFAULT_SHARD_BYTES, base: str = "model"
) -> None:
    """Write ``state`` as ``{base}.safetensors`` (or shards + index) in ``directory``, one tensor at a time."""
    entries = [(k, tuple(v.shape), v.dtype) for k, v in state.items()]
    write_shards(directory, entries, [(directory, lambda: state.items())], max_shard_bytes, base=base)
