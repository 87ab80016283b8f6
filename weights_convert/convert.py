"""The streaming machinery every layout shares: read tensors safely, plan, write shards as tensors arrive.

A conversion first reads only the headers of the source files (safetensors headers; for ``.bin`` pickles, the
metadata of a memory-mapped, ``weights_only`` load) and checks every name and shape against the model the config
describes, so a bad checkpoint fails before a byte is written. Then it reads one source file at a time and writes
each tensor straight to its precomputed place in the output shards: memory holds one source file's pages and one
tensor, never an output shard.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open

from minillava import quant
from minillava.checkpoint import (
    DEFAULT_SHARD_BYTES,
    SAFETENSORS_DTYPES,
    CheckpointError,
    ShardWriter,
    TensorMeta,
    atomic_directory,
    build_empty,
    cast,
    load_quantized,
    load_state,
    quantized_state,
    safetensors_files,
)
from minillava.config import LlavaConfig
from minillava.model import Llava

from .keymaps import MINILLAVA, KeyMap, UnmappedKeyError

# torch.load(weights_only=True) can be escaped on torch < 2.6 (CVE-2025-32434) and corrupts memory on hostile input
# before 2.10 (CVE-2026-24747): older versions get no pickle at all.
MIN_TORCH_FOR_PICKLES = (2, 10)

WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)

DTYPE_FROM_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class ConversionError(ValueError):
    """A checkpoint this converter cannot or will not turn into a minillava model; the message says why."""


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or a ``ValueError`` naming the file."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


# --- finding and reading weight files --------------------------------------------------------------------------


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a transformers-style directory, safetensors preferred, in index order."""
    for index_name, single_name in WEIGHT_LAYOUTS:
        index = directory / index_name
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index}: no 'weight_map'; the index is damaged")
            files = [directory / name for name in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{index} names shard(s) missing from {directory}: {', '.join(missing)}; download them again"
                )
            return files
        if (directory / single_name).is_file():
            return [directory / single_name]
    looked = ", ".join(f"{single}[.index.json]" for _, single in WEIGHT_LAYOUTS)
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


MAX_HEADER_BYTES = 100 * 10**6  # safetensors' own limit


def safetensors_header(path: Path) -> dict[str, tuple[TensorMeta, int]]:
    """``{name: (meta, absolute byte offset)}`` from a safetensors file's header, checked against its size."""
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
    start = 8 + length
    entries = {}
    try:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = DTYPE_FROM_SAFETENSORS.get(info["dtype"])
            if dtype is None:
                raise ConversionError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            meta = TensorMeta(tuple(int(d) for d in info["shape"]), dtype)
            begin, end = (int(x) for x in info["data_offsets"])
            if end - begin != meta.nbytes or begin < 0:
                raise OSError(f"{path}: tensor {name} has {end - begin} bytes for shape {list(meta.shape)}; damaged")
            if start + end > size:
                raise OSError(
                    f"{path}: tensor {name} ends at byte {start + end} but the file has {size} bytes; is it truncated?"
                )
            entries[name] = (meta, start + begin)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        if isinstance(err, ConversionError):
            raise
        raise OSError(f"{path}: malformed safetensors header ({err!r}); is the file damaged?") from None
    return entries


def read_meta(path: Path) -> dict[str, TensorMeta]:
    """Names, shapes and dtypes of a weight file, without reading its data."""
    if path.suffix == ".safetensors":
        return {name: meta for name, (meta, _) in safetensors_header(path).items()}
    state = load_pickle_weights(path)
    return {k: TensorMeta(tuple(v.shape), v.dtype) for k, v in state.items()}


@contextmanager
def open_tensors(path: Path, mapped: bool = False) -> Iterator[Callable[[str], torch.Tensor]]:
    """Yield a getter for the tensors of one weight file.

    ``mapped=False`` (conversion) reads each safetensors tensor into its own buffer, so memory holds one tensor at
    a time whatever the shard size. ``mapped=True`` (loading) returns memory-mapped tensors that stay valid after
    the file is closed. ``.bin`` pickles are always memory-mapped: their touched pages stay resident until the
    file's last tensor is released, so a conversion holds at most one ``.bin`` shard.
    """
    if path.suffix != ".safetensors":
        state = load_pickle_weights(path)
        yield state.__getitem__
        del state
    elif mapped:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                yield f.get_tensor
        except SafetensorError as err:
            raise OSError(f"{path}: cannot read safetensors file ({err}); is it truncated?") from None
    else:
        entries = safetensors_header(path)
        with open(path, "rb") as f:

            def read(name: str) -> torch.Tensor:
                meta, offset = entries[name]
                if meta.nbytes == 0:
                    return torch.empty(meta.shape, dtype=meta.dtype)
                buffer = bytearray(meta.nbytes)
                f.seek(offset)
                if f.readinto(buffer) != meta.nbytes:
                    raise OSError(f"{path}: tensor {name} is cut short; is the file truncated?")
                return torch.frombuffer(buffer, dtype=meta.dtype).reshape(meta.shape)

            yield read


# --- sources and the plan --------------------------------------------------------------------------------------


@dataclass
class Part:
    """One source weight file and the key table that names its tensors."""

    path: Path
    keymap: KeyMap
    meta: dict[str, TensorMeta]
    dtype: torch.dtype | None = None  # floating tensors are cast to this unless the caller asks for a dtype


class Source(Protocol):
    """A checkpoint layout this package reads (see ``hf_llava`` and ``original_llava``)."""

    name: str
    directory: Path

    def config(self) -> LlavaConfig: ...

    def parts(self) -> list[Part]: ...

    def carried_files(self) -> list[Path]: ...


@dataclass(frozen=True)
class Planned:
    ours: str
    theirs: str
    meta: TensorMeta
    dtype: torch.dtype | None = None  # the part's default cast

    def target(self, wanted: torch.dtype | None) -> torch.dtype | None:
        """The dtype to cast to: the caller's choice, else the part's default, else none (keep)."""
        return wanted if wanted is not None else self.dtype


def plan(source: Source, config: LlavaConfig) -> list[tuple[Path, list[Planned]]]:
    """Map every source tensor to its minillava name and check the whole set before any data is read.

    Raises ``CheckpointError`` naming unmapped, duplicated, unexpected and mis-shaped tensors (by their names in
    the source files) and missing ones (by minillava name).
    """
    expected = {k: tuple(v.shape) for k, v in build_empty(config).state_dict().items()}
    origin: dict[str, str] = {}
    misshaped: set[str] = set()
    problems: dict[str, list[str]] = {"unexpected tensors": [], "tensors given twice": [], "wrong shapes": []}
    result = []
    for part in source.parts():
        planned = []
        for theirs, meta in part.meta.items():
            where = f"{theirs} (in {part.path.name})"
            try:
                ours = part.keymap.to_ours(theirs)
            except UnmappedKeyError:
                problems["unexpected tensors"].append(where)
                continue
            # transformers 5.x may save lm_head even when it is tied to the embedding: nothing to keep.
            if ours is None or (ours == "llm.lm_head.weight" and config.text.tie_word_embeddings):
                continue
            if ours not in expected:
                problems["unexpected tensors"].append(where)
            elif ours in origin:
                problems["tensors given twice"].append(f"{ours} (as {origin[ours]} and as {where})")
            elif meta.shape != expected[ours]:
                misshaped.add(ours)
                problems["wrong shapes"].append(f"{where} is {list(meta.shape)}, expected {list(expected[ours])}")
            else:
                origin[ours] = where
                planned.append(Planned(ours, theirs, meta, part.dtype))
        if planned:
            result.append((part.path, planned))
    problems["missing tensors"] = sorted(set(expected) - set(origin) - misshaped)
    found = [f"{kind}: {', '.join(items)}" for kind, items in problems.items() if items]
    if found:
        raise CheckpointError(
            f"{source.directory}: " + "; ".join(found) + f". Is this the {source.name} checkpoint its config describes?"
        )
    return result


def detect(directory: str | Path, vision_tower: str | Path | None = None) -> Source:
    """The source object for a checkpoint directory, chosen from its ``config.json``.

    Raises ``ConversionError`` listing the supported layouts and what was found when none fits.
    """
    from .hf_llava import HfLlavaSource
    from .original_llava import OriginalLlavaSource

    sources = (HfLlavaSource, OriginalLlavaSource)
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{directory}: no config.json; expected a minillava, llava-hf or original LLaVA checkpoint directory"
        )
    raw = read_json(config_path)
    if raw.get("format") == "minillava":
        return MinillavaSource(directory)
    for source in sources:
        if source.matches(directory, raw):
            return source(directory, vision_tower=vision_tower)
    marks = [f"model_type={raw.get('model_type')!r}"]
    marks += [f"has {key}" for key in ("text_config", "mm_vision_tower", "mm_hidden_size") if key in raw]
    weights = sorted(p.name for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    marks.append(f"weight files: {', '.join(weights[:4]) + (' ...' if len(weights) > 4 else '') or 'none'}")
    supported = "; ".join(f"{s.name} ({s.description})" for s in sources)
    raise ConversionError(f"{config_path}: unknown checkpoint layout ({', '.join(marks)}). Supported: {supported}")


class MinillavaSource:
    """A minillava checkpoint as a source: converting it again re-casts (``--dtype``) or re-shards it."""

    name = "minillava"
    description = "a converted checkpoint, to re-cast or re-shard it"

    def __init__(self, directory: Path, vision_tower: str | Path | None = None) -> None:
        if vision_tower is not None:
            raise ValueError(f"{directory} is a minillava checkpoint with its own vision tower; drop --vision-tower")
        self.directory = Path(directory)

    def config(self) -> LlavaConfig:
        return LlavaConfig.load(self.directory)

    def parts(self) -> list[Part]:
        return [Part(path, MINILLAVA, read_meta(path)) for path in safetensors_files(self.directory)]

    def carried_files(self) -> list[Path]:
        from .hf_llava import CARRIED_FILES

        return [self.directory / name for name in CARRIED_FILES if (self.directory / name).is_file()]


# --- writing ---------------------------------------------------------------------------------------------------


ProgressFn = Callable[[int, int, Path], None]


def out_dtype(dtype: torch.dtype, wanted: torch.dtype | None) -> torch.dtype:
    return wanted if wanted is not None and dtype.is_floating_point else dtype


def convert(
    source: Source,
    dst: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    force: bool = False,
    progress: ProgressFn | None = None,
    quantize: str | None = None,
) -> LlavaConfig:
    """Write ``source`` to ``dst`` in the minillava layout, atomically, one source file in memory at a time.

    Args:
        source: from :func:`detect`.
        dst: destination directory; must not exist or be empty unless ``force``.
        dtype: cast floating weights (default: keep the source's dtype; a source may cast an auxiliary part, e.g.
            the original layout casts the CLIP tower to the LLaVA weights' dtype).
        max_shard_bytes: largest output shard.
        force: replace a non-empty ``dst``, only once the new checkpoint is complete.
        progress: called as ``progress(i, n, path)`` before each source file.
        quantize: ``"int8"`` or ``"int4"``: write the decoder's linear layers quantised (see
            :mod:`minillava.quant`); such a checkpoint loads without quantising again.
    """
    config = source.config()
    files = plan(source, config)
    scheme = quant.resolve_scheme(config, quantize, str(source.directory))
    model = build_empty(config, scheme)
    # Weights to quantise now: a quantised source's are copied as they are.
    weights = set()
    if scheme is not None and not config.quantization:
        weights = {f"{name}.weight" for name in quant.quantized_linear_names(model)}
    entries = []
    for _, planned in files:
        for p in planned:
            dtype_out = out_dtype(p.meta.dtype, p.target(dtype))
            if p.ours in weights:
                entries += quant.planned_entries(p.ours, p.meta.shape, dtype_out, scheme)
            else:
                entries.append((p.ours, p.meta.shape, dtype_out))
    with atomic_directory(dst, force=force) as tmp:
        writer = ShardWriter(tmp, entries, max_shard_bytes)
        for i, (path, planned) in enumerate(files):
            if progress:
                progress(i, len(files), path)
            with open_tensors(path) as get:
                for p in planned:
                    tensor = get(p.theirs)
                    if p.ours in weights:
                        scale_dtype = out_dtype(p.meta.dtype, p.target(dtype))
                        rows = lambda a, b, t=tensor: t[a:b]  # noqa: E731
                        codes, scales = quant.quantize_weight(p.ours, rows, p.meta.shape, scheme, scale_dtype)
                        writer.write(p.ours, codes)
                        writer.write(quant.scale_name(p.ours, scheme), scales)
                    else:
                        writer.write(p.ours, cast(tensor, p.target(dtype)))
        if progress:
            progress(len(files), len(files), files[-1][0])
        writer.close()
        model.config.save(tmp)
        for extra in source.carried_files():
            shutil.copy2(extra, tmp / extra.name)
    return config


def load_source(
    source: Source, dtype: torch.dtype | None = None, device: str | torch.device = "cpu", quantize: str | None = None
) -> Llava:
    """Build a ``Llava`` straight from an unconverted checkpoint: the same plan, no copy on disk (``quantize``: the
    decoder's linear layers quantised as they are read)."""
    config = source.config()
    files = plan(source, config)
    model = build_empty(config, quantize)
    if quantize is None:
        state = {}
        for path, planned in files:
            with open_tensors(path, mapped=True) as get:
                for p in planned:
                    state[p.ours] = cast(get(p.theirs), p.target(dtype)).to(device)
        return load_state(model, state, str(source.directory), device)

    def stored():
        for path, planned in files:
            with open_tensors(path, mapped=True) as get:
                for p in planned:
                    tensor = cast(get(p.theirs), p.target(dtype))
                    yield p.ours, p.meta, lambda a, b, t=tensor: t[a:b] if t.dim() else t

    state = quantized_state(stored(), model, quantize, True, dtype, device)
    return load_quantized(model, state, str(source.directory), device)
