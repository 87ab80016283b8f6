"""A checkpoint directory as a source of minillava tensors: which layout it is, and the checked plan that maps it.

:func:`detect` picks the layout from ``config.json``; :func:`plan` maps every source tensor to its minillava name
with the layout's key table and checks the whole set against the model the config describes before any data is
read. The same plan serves loading (:func:`load_source`, nothing written) and conversion
(``python -m weights_convert``), so both give the same tensors.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch.overrides import TorchFunctionMode

from .. import quant
from ..config import LlavaConfig, read_json
from ..model import Llava
from ..safetensors_io import DTYPES, TensorMeta, dtype_name, safetensors_files
from .hf_llava import HfLlavaSource
from .keymaps import MINILLAVA, UnmappedKeyError
from .original_llava import OriginalLlavaSource
from .reading import ConversionError, Part, open_tensors, read_meta


class CheckpointError(ValueError):
    """A checkpoint's tensors do not fit the model its config describes."""


COMPUTE_DTYPES = (*DTYPES.values(), torch.float64)
"""The floating dtypes the model computes in; a stored weight of another dtype (an integer, float8) is refused."""


def cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Cast floating tensors to ``dtype``; integer buffers and ``None`` keep theirs."""
    return tensor.to(cast_dtype(tensor.dtype, dtype))


def cast_dtype(dtype: torch.dtype, wanted: torch.dtype | None) -> torch.dtype:
    """The dtype :func:`cast` gives a tensor of ``dtype``."""
    return wanted if wanted is not None and dtype.is_floating_point else dtype


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


class _SkipInitOnMeta(TorchFunctionMode):
    """Skips ``normal_`` on meta tensors while a model is built: they hold no values to draw, and its meta kernel
    is written in Python behind ``torch._disable_dynamo``, whose first call imports the compiler stack (dynamo,
    inductor, sympy: ~800 modules, most of a small model's load time)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.nn.init.normal_, torch.Tensor.normal_):
            tensor = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "meta":
                return tensor
        return func(*args, **kwargs)


def build_empty(config: LlavaConfig, quantize: str | None = None) -> Llava:
    """A ``Llava`` with parameters on the meta device: shapes only, no memory. Its decoder's linear layers are
    quantised ones when the config records a scheme (or ``quantize`` names one)."""
    with torch.device("meta"), _SkipInitOnMeta():
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


class Source(Protocol):
    """A checkpoint layout minillava reads (:class:`MinillavaSource`, ``hf_llava``, ``original_llava``)."""

    name: str
    directory: Path

    def config(self) -> LlavaConfig: ...

    def parts(self) -> list[Part]: ...


class MinillavaSource:
    """A minillava checkpoint as a source: loading it, or converting it again to re-cast or re-shard it."""

    name = "minillava"
    description = "a converted checkpoint, to re-cast or re-shard it"

    def __init__(self, directory: Path, vision_tower: str | Path | None = None) -> None:
        if vision_tower is not None:
            raise ValueError(
                f"{directory} is a converted minillava checkpoint with its own vision tower; drop vision_tower "
                "(--vision-tower)"
            )
        self.directory = Path(directory)

    def config(self) -> LlavaConfig:
        return LlavaConfig.load(self.directory)

    def parts(self) -> list[Part]:
        return [Part(path, MINILLAVA, read_meta(path)) for path in safetensors_files(self.directory)]


LAYOUTS = (HfLlavaSource, OriginalLlavaSource)
"""The layouts converted from, tried in this order."""


def detect(directory: str | Path, vision_tower: str | Path | None = None) -> Source:
    """The source object for a checkpoint directory, chosen from its ``config.json``.

    Raises ``ConversionError`` listing the supported layouts and what was found when none fits.
    """
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
        return MinillavaSource(directory, vision_tower)
    for source in LAYOUTS:
        if source.matches(directory, raw):
            return source(directory, vision_tower=vision_tower)
    marks = [f"model_type={raw.get('model_type')!r}"]
    marks += [f"has {key}" for key in ("text_config", "mm_vision_tower", "mm_hidden_size") if key in raw]
    weights = sorted(p.name for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    marks.append(f"weight files: {', '.join(weights[:4]) + (' ...' if len(weights) > 4 else '') or 'none'}")
    supported = "; ".join(f"{s.name} ({s.description})" for s in LAYOUTS)
    raise ConversionError(f"{config_path}: unknown checkpoint layout ({', '.join(marks)}). Supported: {supported}")


@dataclass(frozen=True)
class Planned:
    """One tensor of the plan: its minillava name, its name in the source file, its metadata there."""

    ours: str
    theirs: str
    meta: TensorMeta
    dtype: torch.dtype | None = None  # the part's default cast

    def target(self, wanted: torch.dtype | None) -> torch.dtype | None:
        """The dtype to cast to: the caller's choice, else the part's default, else none (keep)."""
        return wanted if wanted is not None else self.dtype


def plan(source: Source, config: LlavaConfig) -> list[tuple[Path, list[Planned]]]:
    """Map every source tensor to its minillava name and check the whole set before any data is read.

    Raises ``CheckpointError`` naming unmapped, duplicated, unexpected, mis-shaped and wrongly typed tensors (by
    their names in the source files) and missing ones (by minillava name).
    """
    empty = build_empty(config).state_dict()
    expected = {k: tuple(v.shape) for k, v in empty.items()}
    origin: dict[str, str] = {}
    misshaped: set[str] = set()
    problems: dict[str, list[str]] = {
        "unexpected tensors": [],
        "tensors given twice": [],
        "wrong shapes": [],
        "wrong dtypes": [],
    }
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
            elif not _dtype_fits(meta.dtype, empty[ours].dtype):
                misshaped.add(ours)
                wanted = "a floating dtype" if empty[ours].is_floating_point() else dtype_name(empty[ours].dtype)
                problems["wrong dtypes"].append(f"{where} is {dtype_name(meta.dtype)}, expected {wanted}")
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


def _dtype_fits(stored: torch.dtype, wanted: torch.dtype) -> bool:
    return stored in COMPUTE_DTYPES if wanted.is_floating_point else stored == wanted


def load_source(
    source: Source, dtype: torch.dtype | None = None, device: str | torch.device = "cpu", quantize: str | None = None
) -> Llava:
    """Build a ``Llava`` from any source: the plan's tensors, memory-mapped and cast once; no copy on disk.

    With ``quantize`` (or a quantised checkpoint) the decoder's linear weights are quantised a block of rows at a
    time as they are read, and nothing is memory-mapped: memory ends up holding the quantised model, never its
    full-precision weights."""
    config = source.config()
    scheme = quant.resolve_scheme(config, quantize, str(source.directory))
    files = plan(source, config)
    model = build_empty(config, scheme)
    state = {}
    if scheme is None:
        for path, planned in files:
            with open_tensors(path, mapped=True) as get:
                for p in planned:
                    state[p.ours] = cast(get(p.theirs), p.target(dtype)).to(device)
        return load_state(model, state, str(source.directory), device)
    for path, planned in files:
        for name, tensor in quantized_tensors(path, planned, dtype, scheme, requantize=not config.quantization):
            state[name] = tensor.to(device)
    load_state(model, state, str(source.directory), device)
    state.clear()  # the int4 weights' checkpoint form goes as each is repacked
    quant.finish_load(model)
    return model


def quantized_tensors(
    path: Path, planned: list[Planned], dtype: torch.dtype | None, quantize: str, requantize: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one source file in a ``quantize`` checkpoint's form: the decoder's linear weights quantised
    (when ``requantize``; a quantised source's are taken as stored) with their scales in the cast dtype, the rest
    cast. One weight is read a block of rows at a time, so memory holds one block of it in full precision."""
    with open_tensors(path) as get:
        for p in planned:
            if requantize and quant.is_quantized_weight(p.ours):
                scale_dtype = cast_dtype(p.meta.dtype, p.target(dtype))
                rows = getattr(get, "rows", None) or (lambda name, a, b: get(name)[a:b])
                read = functools.partial(rows, p.theirs)
                codes, scales = quant.quantize_weight(p.ours, read, p.meta.shape, quantize, scale_dtype)
                yield p.ours, codes
                yield quant.scale_name(p.ours, quantize), scales
            else:
                yield p.ours, cast(get(p.theirs), p.target(dtype))
