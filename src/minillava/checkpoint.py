"""The minillava checkpoint layout: ``config.json`` + safetensors, sharded with an index when large.

Loading builds the model on the meta device, reads tensors one at a time from the memory-mapped
files, casts each once, and hands them over with ``load_state_dict(assign=True, strict=True)``, so
RAM never holds the model twice. Writing goes to a temporary directory that is renamed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from . import quant
from .config import LlavaConfig
from .model import Llava

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_SHARD_BYTES = 2 * 1024**3

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


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


class CheckpointError(ValueError):
    """A checkpoint's tensors do not fit the model its config describes."""


def safetensors_files(directory: str | os.PathLike) -> list[Path]:
    """The weight files of a safetensors checkpoint directory, in index order."""
    directory = Path(directory)
    index = directory / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that do not exist: {', '.join(missing)}")
        return files
    if (directory / SINGLE_NAME).is_file():
        return [directory / SINGLE_NAME]
    raise FileNotFoundError(f"{directory}: no {SINGLE_NAME} or {INDEX_NAME}")


def iter_safetensors(files: Iterable[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from safetensors files, one tensor at a time."""
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (OSError, RuntimeError) as err:
            if isinstance(err, FileNotFoundError):
                raise
            raise OSError(f"{path}: cannot read safetensors file ({err}); is it truncated?") from None


def iter_stored(files: Iterable[Path]) -> Iterator[tuple[str, TensorMeta, Callable[[int, int], torch.Tensor]]]:
    """Yield ``(name, meta, read)`` for the tensors of safetensors files, where ``read(start, stop)`` reads rows
    ``start:stop`` into fresh memory (``read(0, 0)`` a 0-dim tensor whole). Unlike a memory map, nothing read
    stays resident once the caller drops it, so a weight can be quantised a block of rows at a time."""
    from weights_convert.convert import safetensors_header

    for path in files:
        entries = safetensors_header(path)
        with open(path, "rb") as f:
            for name, (meta, offset) in entries.items():

                def read(start: int, stop: int, meta=meta, offset=offset, name=name, path=path) -> torch.Tensor:
                    if not meta.shape:
                        start, stop, row_bytes, shape = 0, 1, meta.nbytes, ()
                    else:
                        row_bytes = meta.nbytes // max(meta.shape[0], 1)
                        shape = (stop - start, *meta.shape[1:])
                    buffer = bytearray((stop - start) * row_bytes)
                    f.seek(offset + start * row_bytes)
                    if f.readinto(buffer) != len(buffer):
                        raise OSError(f"{path}: tensor {name} is cut short; is the file truncated?")
                    if not buffer:
                        return torch.empty(shape, dtype=meta.dtype)
                    return torch.frombuffer(buffer, dtype=meta.dtype).reshape(shape)

                yield name, meta, read


def quantized_state(
    stored: Iterable[tuple[str, TensorMeta, Callable[[int, int], torch.Tensor]]],
    model: Llava,
    quantize: str,
    requantize: bool,
    dtype: torch.dtype | None,
    device,
) -> dict[str, torch.Tensor]:
    """The state of a model being loaded with ``quantize``: the decoder's linear weights quantised block by block
    as they are read (when ``requantize``; a quantised checkpoint's are taken as stored), everything else cast."""
    weights = {f"{name}.weight" for name in quant.quantized_linear_names(model)}
    state = {}
    for name, meta, read in stored:
        if requantize and name in weights:
            codes, scales = quant.quantize_weight(name, read, meta.shape, quantize, dtype or meta.dtype)
            state[name], state[quant.scale_name(name, quantize)] = codes.to(device), scales.to(device)
        else:
            state[name] = cast(read(0, meta.shape[0] if meta.shape else 0), dtype).to(device)
    return state


def cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Cast floating tensors to ``dtype``; integer buffers and ``None`` keep theirs."""
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype)


def check_state(expected: dict[str, torch.Size], found: dict[str, torch.Size], where: str, hint: str = "") -> None:
    """Raise ``CheckpointError`` naming every missing, unexpected and mis-shaped tensor."""
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    if shapes:
        problems.append(
            "wrong shapes: " + ", ".join(f"{k} is {list(found[k])}, expected {list(expected[k])}" for k in shapes)
        )
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems) + (f". {hint}" if hint else ""))


def build_empty(config: LlavaConfig, quantize: str | None = None) -> Llava:
    """A ``Llava`` with parameters on the meta device: shapes only, no memory. Its decoder's linear layers are
    quantised ones when the config records a scheme (or ``quantize`` names one)."""
    with torch.device("meta"):
        model = Llava(config)
    scheme = quant.resolve_scheme(config, quantize, "the config")
    if scheme is not None:
        quant.prepare(model, scheme)
    return model


def load_state(model: Llava, state: dict[str, torch.Tensor], where: str, device=None) -> Llava:
    """Give ``state`` to a meta-device ``model`` (strict, by assignment) and rebuild derived buffers."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state(expected, {k: v.shape for k, v in state.items()}, where)
    model.load_state_dict(state, strict=True, assign=True)
    model.llm.rotary.reset_buffers(device or "cpu")
    return model.eval()


def is_minillava_dir(path: Path) -> bool:
    """Whether ``path/config.json`` is a minillava config (anything else goes through ``weights_convert``)."""
    try:
        return json.loads((path / "config.json").read_text()).get("format") == "minillava"
    except (OSError, ValueError, AttributeError):
        return False


def _unconverted_source(path: Path, vision_tower: str | os.PathLike | None):
    # Lazy: weights_convert is only needed for directories that were never converted.
    from weights_convert.convert import detect

    return detect(path, vision_tower=vision_tower)


def load_config(path: str | os.PathLike, vision_tower: str | os.PathLike | None = None) -> LlavaConfig:
    """The ``LlavaConfig`` of a minillava directory, or of an unconverted llava-hf / original LLaVA directory as
    :func:`load` would build it (image settings, placeholder id, chat template and generation defaults included)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory")
    if is_minillava_dir(path):
        if vision_tower is not None:
            raise ValueError(f"{path} is a converted minillava checkpoint with its own vision tower; drop vision_tower")
        return LlavaConfig.load(path)
    return _unconverted_source(path, vision_tower).config()


def load(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    vision_tower: str | os.PathLike | None = None,
    quantize: str | None = None,
) -> Llava:
    """Load a checkpoint directory: minillava, or an unconverted llava-hf or original LLaVA one.

    Unconverted directories are mapped on the fly with the converter's key tables (no copy on disk); their
    tokenizer files stay where they are. Weights are memory-mapped and cast once, so RAM holds the model once.

    Args:
        path: a directory written by ``python -m weights_convert`` or :func:`save`, or a llava-hf / original
            LLaVA checkpoint directory.
        dtype: cast floating weights to this dtype (default: keep the stored dtype).
        device: where the weights go.
        vision_tower: for an original LLaVA directory whose weights lack the vision tower, the CLIP checkpoint
            directory to take it from.
        quantize: ``"int8"`` or ``"int4"``: quantise the decoder's linear layers while loading (weight-only; see
            :mod:`minillava.quant`), a block of rows at a time, so memory never holds them in full precision. A
            checkpoint written quantised (``python -m weights_convert --quantize``) loads as it is.
    """
    quant.check_scheme(quantize)
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory")
    if not is_minillava_dir(path):
        from weights_convert.convert import load_source

        return load_source(_unconverted_source(path, vision_tower), dtype, device, quantize)
    config = load_config(path, vision_tower)
    scheme = quant.resolve_scheme(config, quantize, str(path))
    model = build_empty(config, scheme)
    files = safetensors_files(path)
    if scheme is None:
        state = {name: cast(t, dtype).to(device) for name, t in iter_safetensors(files)}
        return load_state(model, state, str(path), device)
    state = quantized_state(iter_stored(files), model, scheme, config.quantization is None, dtype, device)
    return load_quantized(model, state, str(path), device)


def load_quantized(model: Llava, state: dict[str, torch.Tensor], where: str, device=None) -> Llava:
    """:func:`load_state` for a model :func:`minillava.quant.prepare` made; int4 weights end in the kernel's
    layout."""
    load_state(model, state, where, device)
    state.clear()  # the int4 weights' checkpoint form goes as each is repacked
    quant.finish_load(model)
    return model


class ShardWriter:
    """Safetensors shards whose layout is fixed up front, so each tensor is written the moment it arrives.

    ``entries`` (name, shape, dtype) are cut into shards of at most ``max_shard_bytes`` in the given order. Every
    shard file gets its header and full length at once; :meth:`write` puts a tensor's bytes at its offset. Nothing
    is buffered, unlike ``safetensors.save_file``, which needs (and copies) a whole shard in memory.
    """

    def __init__(
        self,
        directory: Path,
        entries: list[tuple[str, tuple[int, ...], torch.dtype]],
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
            raise CheckpointError(
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
            raise CheckpointError(f"tensors planned but never written: {', '.join(missing)}")
        if self.index_path is not None:
            weight_map = {name: path.name for name, (path, _, _) in self.slots.items()}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            self.index_path.write_text(json.dumps(index, indent=2) + "\n")


def write_state(directory: Path, state: dict[str, torch.Tensor], max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Write ``state`` as ``model.safetensors`` (or shards + index) in ``directory``, one tensor at a time."""
    writer = ShardWriter(directory, [(k, tuple(v.shape), v.dtype) for k, v in state.items()], max_shard_bytes)
    for name, tensor in state.items():
        writer.write(name, tensor)
    writer.close()


@contextmanager
def atomic_directory(dst: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``dst`` that becomes ``dst`` only if the block succeeds.

    A non-empty ``dst`` is refused unless ``force``; then it is replaced only after the new one is complete.
    """
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not force:
        raise FileExistsError(f"{dst} exists and is not empty; choose another destination or pass --force")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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
        model.config.save(tmp)
        state = {name: cast(tensor.detach(), dtype) for name, tensor in quant.checkpoint_tensors(model).items()}
        write_state(tmp, state, max_shard_bytes)
        for extra in extra_files:
            shutil.copy2(extra, tmp / Path(extra).name)
