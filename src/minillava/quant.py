"""Weight-only int8 and 4-bit linear layers for the decoder, and the kernels they run on.

Decoding one token reads every weight once, so its speed is bytes per second: weights of one or half a byte
decode two to four times faster than bf16. Activations stay in the model's dtype; only the stored weights
shrink. The CLIP tower, the projector, the embedding table and the norms keep the load dtype.

Schemes, and their checkpoint form (the names a ``state_dict`` and a quantised checkpoint use):

- ``int8``: one scale per output row, symmetric: ``w[n, k] ~ q[n, k] * scale[n]`` with ``q`` in -127..127.
  ``weight`` int8 ``[N, K]``, ``weight_scale`` ``[N]``.
- ``int4``: groups of :data:`INT4_GROUP` consecutive input columns, asymmetric:
  ``w ~ (q - 8) * scale + zero`` with ``q`` in 0..15 (``zero`` is the value of the middle code; the form torch's
  int4 kernels take). ``weight`` uint8 ``[N, K/2]`` with column ``2j`` in the low nibble of byte ``j`` and
  ``2j+1`` in the high one; ``scales_and_zeros`` ``[K/G, N, 2]``. The lm_head stays int8 (:func:`layer_scheme`).

A call with at most :data:`FUSED_ROWS` rows (decode) runs torch's fused weight-only kernel; more rows (prefill)
dequantise a tile of output rows at a time and run a dense GEMM on it (:func:`minillava.linear.tiled_linear`), so
long prompts cost about what a dense model's do. In memory the int4 weight is held in the kernel's own packed
layout (which depends on the device and the CPU's vector width); :meth:`Int4Linear.portable` recovers the
checkpoint form from it, so saving writes the form above.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .linear import TILE_ROWS, tiled_linear

SCHEMES = ("int8", "int4")
INT4_GROUP = 32
"""Input columns per int4 scale/zero pair: llama.cpp's Q4_0 block size; 5 bits per weight with bf16 scales."""

FUSED_ROWS = 32
"""Calls with at most this many rows use the fused weight-only kernels; larger ones dequantise tiles. The fused
kernels' time grows with the rows (on a Zen 3 core, 4096 -> 11008: int8 8 ms for one row, 94 ms for 32, 189 ms for
64; dequantised int8 tiles + fp32 GEMM: 107 ms for 32, 163 ms for 64)."""


def check_scheme(quantize: str | None) -> str | None:
    """``quantize`` itself if it names a scheme (or is None); else a ``ValueError`` that lists the schemes."""
    if quantize is None or quantize in SCHEMES:
        return quantize
    raise ValueError(f"quantize must be one of {', '.join(map(repr, SCHEMES))} or None, got {quantize!r}")


def layer_scheme(name: str, quantize: str) -> str:
    """The scheme of the layer ``name``: int4 keeps the lm_head at int8, as llama.cpp's 4-bit files keep their
    output matrix at 6 bits (4-bit logits lose far more than 4-bit hidden layers; the head is ~2% of a 7B)."""
    return "int8" if quantize == "int4" and name == "llm.lm_head" else quantize


def is_quantized_weight(name: str) -> bool:
    """Whether the checkpoint tensor ``name`` is the weight of a layer :func:`quantized_linear_names` lists."""
    return name == "llm.lm_head.weight" or (name.startswith("llm.layers.") and name.endswith("_proj.weight"))


def quantized_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the decoder's linear layers that a scheme quantises: attention and MLP projections of
    every block, and the lm_head unless it is tied to the embedding table (then the table serves both)."""
    kinds = (nn.Linear, Int8Linear, Int4Linear)
    names = [f"llm.{name}" for name, m in model.llm.layers.named_modules(prefix="layers") if isinstance(m, kinds)]
    if isinstance(model.llm.lm_head, kinds):
        names.append("llm.lm_head")
    return names


# --- quantise / dequantise ---------------------------------------------------------------------------------------


def quantize_int8(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, K]`` floats -> (int8 codes ``[N, K]``, scales ``[N]`` in ``scale_dtype``).

    The codes are computed against the scales as they will be stored (rounded to ``scale_dtype``), so the
    dequantised weight is the nearest the stored scale allows."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).to(scale_dtype)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero row: any scale, codes 0
    codes = (w / scale.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return codes, scale


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return codes.to(dtype) * scale.to(dtype)[:, None]


def quantize_int4(
    weight: torch.Tensor, scale_dtype: torch.dtype, group: int = INT4_GROUP
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, K]`` floats -> (codes 0..15 as uint8 ``[N, K]``, ``scales_and_zeros`` ``[K/group, N, 2]``).

    Each group's [min, max] maps onto codes 0..15; scale and zero are rounded to ``scale_dtype`` before the codes
    are computed against them."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // group, group)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((high - low) / 15).to(scale_dtype)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # a constant group: code 8 is exact
    zero = torch.where(high == low, low, low + 8 * scale.float()).to(scale_dtype)
    codes = ((w - zero.float()[..., None]) / scale.float()[..., None] + 8).round_().clamp_(0, 15)
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
    return codes.to(torch.uint8).reshape(n, k), scales_and_zeros


def dequantize_int4(
    codes: torch.Tensor, scales_and_zeros: torch.Tensor, dtype: torch.dtype, group: int = INT4_GROUP
) -> torch.Tensor:
    """Codes ``[N, K]`` and ``scales_and_zeros`` ``[K/group, N, 2]`` -> ``[N, K]`` in ``dtype``."""
    n, k = codes.shape
    scale, zero = scales_and_zeros.to(dtype).transpose(0, 1).unbind(-1)
    w = (codes.to(dtype).reshape(n, k // group, group) - 8) * scale[..., None] + zero[..., None]
    return w.reshape(n, k)


def nibbles_to_bytes(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 ``[N, K]`` -> the checkpoint's uint8 ``[N, K/2]`` (even column in the low nibble)."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def bytes_to_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The checkpoint's uint8 ``[N, K/2]`` -> codes 0..15 ``[N, K]``."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


# --- the int4 kernels' packed layouts ------------------------------------------------------------------------------

_PACK_ROWS = TILE_ROWS
"""Rows packed per call (256): a multiple of every layout's row block (8 on CUDA, 32 with AVX2, 64 with AVX-512),
so the blocks of a longer weight pack exactly as they would inside it; dequantised tiles start at multiples of it."""


def _pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 ``[R, K]`` -> the int4 kernel's packed weight on their device."""
    if codes.device.type == "cpu":
        return torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)
    # The CUDA packer takes two codes per byte, the even column in the high nibble.
    return torch._convert_weight_to_int4pack((codes[:, 0::2] << 4) | codes[:, 1::2], 8)


@functools.lru_cache(maxsize=8)
def _layout(device: torch.device, rows: int, cols: int) -> torch.Tensor:
    """For a ``[rows, cols]`` block: which nibble of its packed form (low nibble of each byte first, bytes in
    memory order) holds each code, as int32 indices in row-major code order.

    Learned from the kernel's own packer (pack the base-16 digits of every code's index, read them back), so it
    follows whatever layout this build and device use."""
    index = torch.arange(rows * cols, device=device)
    source = torch.zeros(rows * cols, dtype=torch.int64, device=device)  # nibble -> code index
    digit = 0
    while (rows * cols - 1) >> (4 * digit):
        packed = _pack_codes(((index >> (4 * digit)) & 15).to(torch.uint8).reshape(rows, cols))
        source |= _nibbles(packed).long() << (4 * digit)
        digit += 1
    where = torch.empty(rows * cols, dtype=torch.int32, device=device)
    where[source] = torch.arange(rows * cols, dtype=torch.int32, device=device)
    return where


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """All nibbles of a packed tensor in memory order, low nibble of each byte first."""
    flat = packed.contiguous().view(torch.uint8).reshape(1, -1)
    return bytes_to_nibbles(flat).reshape(-1)


def int4_pack(codes: Callable[[int, int], torch.Tensor], rows: int) -> torch.Tensor:
    """The int4 kernel's packed weight of a ``rows``-row weight, whose codes ``codes(start, stop)`` gives a block of
    rows at a time (so no full-size temporary is made)."""
    blocks = [_pack_codes(codes(a, min(a + _PACK_ROWS, rows))) for a in range(0, rows, _PACK_ROWS)]
    return torch.cat(blocks) if len(blocks) > 1 else blocks[0]


def int4_codes(packed: torch.Tensor, rows: int, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Codes ``[stop - start, K]`` of rows ``start:stop`` (``start`` a multiple of ``_PACK_ROWS``) of a packed
    weight of ``rows`` rows, as uint8 or written into ``out`` (any dtype)."""
    per_row = packed.numel() // rows  # packed elements per weight row, whatever the layout's shape
    flat = packed.reshape(-1)
    cols = 2 * per_row * packed.element_size()
    out = torch.empty(stop - start, cols, dtype=torch.uint8, device=packed.device) if out is None else out
    for a in range(start, stop, _PACK_ROWS):
        b = min(a + _PACK_ROWS, stop)
        nibbles = _nibbles(flat[a * per_row : b * per_row])
        out[a - start : b - start].view(-1).copy_(nibbles.index_select(0, _layout(packed.device, b - a, cols)))
    return out


# --- layers -----------------------------------------------------------------------------------------------------


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 weights and one scale per output row (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        frozen = functools.partial(nn.Parameter, requires_grad=False)
        self.weight = frozen(torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.weight_scale = frozen(torch.empty(out_features, dtype=dtype, device=device))
        self.bias = frozen(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, weight.dtype, weight.device)
        codes, scale = quantize_int8(weight, weight.dtype)
        layer.weight.data, layer.weight_scale.data = codes, scale
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().clone()
        return layer

    def dequantize(self, start: int = 0, stop: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of the weight in ``dtype`` (default: the scales' dtype)."""
        rows = slice(start, stop)
        return dequantize_int8(self.weight[rows], self.weight_scale[rows], dtype or self.weight_scale.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] <= FUSED_ROWS and x.device.type == "cpu":
            y = torch._weight_int8pack_mm(x2, self.weight, self.weight_scale.to(x.dtype))
        elif x.requires_grad and torch.is_grad_enabled():
            y = F.linear(x2, self.dequantize(dtype=x.dtype))  # gradients for the input flow through the full weight
        else:
            # The per-row scale factors out of the product: tiles hold the codes, the scale multiplies the output.
            codes = lambda a, b, tile: tile.copy_(self.weight[a:b])  # noqa: E731
            y = tiled_linear(x2, self.out_features, codes, self.bias, column_scale=self.weight_scale)
            return y.reshape(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int4Linear(nn.Module):
    """``nn.Linear`` with 4-bit weights in groups of ``group`` input columns (see the module docstring).

    ``weight`` holds the int4 kernel's packed layout for this device (not the checkpoint's); :meth:`portable`
    gives the checkpoint form."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None, group: int = INT4_GROUP
    ) -> None:
        super().__init__()
        if in_features % group or out_features % 16:
            raise ValueError(
                f"int4 needs in_features divisible by {group} and out_features by 16, got a "
                f"{in_features} -> {out_features} linear layer; quantize this model with 'int8'"
            )
        self.in_features, self.out_features, self.group = in_features, out_features, group
        frozen = functools.partial(nn.Parameter, requires_grad=False)
        self.weight = frozen(torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.scales_and_zeros = frozen(torch.empty(in_features // group, out_features, 2, dtype=dtype, device=device))
        self.bias = frozen(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: int = INT4_GROUP) -> Int4Linear:
        weight = linear.weight.detach()
        bias = linear.bias is not None
        layer = cls(linear.in_features, linear.out_features, bias, weight.dtype, weight.device, group)
        codes, scales_and_zeros = quantize_int4(weight, weight.dtype, group)
        layer.weight.data = int4_pack(lambda a, b: codes[a:b], codes.shape[0])
        layer.scales_and_zeros.data = scales_and_zeros
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().clone()
        return layer

    def portable(self) -> torch.Tensor:
        """The weight in the checkpoint's form: uint8 ``[N, K/2]``, even column in the low nibble."""
        return nibbles_to_bytes(int4_codes(self.weight, self.out_features, 0, self.out_features))

    def dequantize(self, start: int = 0, stop: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``start:stop`` (``start`` a multiple of 256) of the weight in ``dtype`` (default: the scales')."""
        stop = self.out_features if stop is None else stop
        codes = int4_codes(self.weight, self.out_features, start, stop)
        return dequantize_int4(
            codes, self.scales_and_zeros[:, start:stop], dtype or self.scales_and_zeros.dtype, self.group
        )

    def _dequantize_into(self, start: int, stop: int, tile: torch.Tensor) -> torch.Tensor:
        # (q - 8) * scale + zero, as q * scale + (zero - 8 * scale), in place once the codes are in the tile.
        int4_codes(self.weight, self.out_features, start, stop, out=tile)
        scale, zero = self.scales_and_zeros[:, start:stop].to(tile.dtype).transpose(0, 1).unbind(-1)
        groups = tile.view(stop - start, -1, self.group)
        groups.mul_(scale[..., None]).add_((zero - 8 * scale)[..., None])  # faster here than one addcmul
        return tile

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x.device.type != "cpu":
            y = torch._weight_int4pack_mm(x2, self.weight, self.group, self.scales_and_zeros.to(x.dtype))
        elif x2.shape[0] <= FUSED_ROWS:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.weight, self.group, self.scales_and_zeros.to(x.dtype))
        elif x.requires_grad and torch.is_grad_enabled():
            y = F.linear(x2, self.dequantize(dtype=x.dtype))  # gradients for the input flow through the full weight
        else:
            y = tiled_linear(x2, self.out_features, self._dequantize_into, self.bias)
            return y.reshape(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"group={self.group}"
        )


LAYERS = {"int8": Int8Linear, "int4": Int4Linear}


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, layer)


def recorded(config, quantize: str):
    """``config`` (a :class:`~minillava.config.LlavaConfig`) recording that its model is quantised with ``quantize``."""
    info = {"scheme": quantize, **({"group": INT4_GROUP} if quantize == "int4" else {})}
    return dataclasses.replace(config, quantization=info)


def quantize_model(model: nn.Module, quantize: str) -> nn.Module:
    """Replace the decoder's linear layers of a loaded model (see :func:`quantized_linear_names`) with quantised
    ones, one layer at a time, in place; returns ``model``. To quantise while loading (never holding the full
    precision model), pass ``quantize=`` to :func:`minillava.load` instead."""
    if getattr(model.config, "quantization", None):
        raise ValueError(f"the model is already quantised ({model.config.quantization['scheme']})")
    check_scheme(quantize)
    for name in quantized_linear_names(model):
        _replace(model, name, LAYERS[layer_scheme(name, quantize)].from_linear(model.get_submodule(name)))
    model.config = recorded(model.config, quantize)
    return model


# --- loading and saving --------------------------------------------------------------------------------------------

RowReader = Callable[[int, int], torch.Tensor]
"""Rows ``start:stop`` of a stored tensor, read on demand (so a large weight is never held whole)."""

QUANTIZE_ROWS = 256
"""Rows of a float weight read and quantised at a time while loading or converting."""


def stored_scheme(config, where: str) -> str | None:
    """The scheme a checkpoint's config records (None for full precision), checked."""
    info = config.quantization
    if info is None:
        return None
    scheme = info.get("scheme") if isinstance(info, dict) else None
    if scheme not in SCHEMES or (scheme == "int4" and info.get("group") != INT4_GROUP):
        raise ValueError(f"{where}: unsupported quantization {info!r}; this minillava reads int8 and int4 (group 32)")
    return scheme


def resolve_scheme(config, quantize: str | None, where: str) -> str | None:
    """The scheme a load ends with: the checkpoint's own, or ``quantize`` for a full-precision one. Asking for
    another scheme than a quantised checkpoint holds is an error (quantising twice only loses accuracy)."""
    quantize = check_scheme(quantize)
    stored = stored_scheme(config, where)
    if stored is not None and quantize not in (None, stored):
        raise ValueError(
            f"{where} is already quantised as {stored}; it cannot be quantised again as {quantize}. Load it as it is "
            f"(quantize=None or {stored!r}), or quantise its full-precision source"
        )
    return stored or quantize


def prepare(model: nn.Module, quantize: str) -> None:
    """Swap the decoder's linear layers of a meta-device model for empty quantised ones (shapes only)."""
    for name in quantized_linear_names(model):
        linear = model.get_submodule(name)
        layer_type = LAYERS[layer_scheme(name, quantize)]
        with torch.device("meta"):
            _replace(model, name, layer_type(linear.in_features, linear.out_features, linear.bias is not None, None))
    model.config = recorded(model.config, quantize)


def scale_name(weight_name: str, quantize: str) -> str:
    """The name of the scales that go with a quantised weight ``<layer>.weight``."""
    layer = weight_name.removesuffix(".weight")
    return f"{layer}.weight_scale" if layer_scheme(layer, quantize) == "int8" else f"{layer}.scales_and_zeros"


def planned_entries(
    name: str, shape: tuple[int, ...], scale_dtype: torch.dtype, quantize: str
) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """The checkpoint entries a full-precision linear weight ``name`` becomes: ``(name, shape, dtype)``."""
    n, k = shape
    if layer_scheme(name.removesuffix(".weight"), quantize) == "int8":
        return [(name, (n, k), torch.int8), (scale_name(name, quantize), (n,), scale_dtype)]
    return [(name, (n, k // 2), torch.uint8), (scale_name(name, quantize), (k // INT4_GROUP, n, 2), scale_dtype)]


def quantize_weight(
    name: str, read: RowReader, shape: tuple[int, ...], quantize: str, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise the stored ``[N, K]`` float weight ``name`` :data:`QUANTIZE_ROWS` rows at a time into its checkpoint
    form: ``(int8 codes, scales)`` or ``(uint8 nibbles, scales_and_zeros)``."""
    quantize = layer_scheme(name.removesuffix(".weight"), quantize)
    n, k = shape
    if quantize == "int4" and (k % INT4_GROUP or n % 16):
        raise ValueError(f"int4 needs weights [N, K] with K divisible by {INT4_GROUP} and N by 16, got {[n, k]}")
    if quantize == "int8":
        codes, scales = torch.empty(n, k, dtype=torch.int8), torch.empty(n, dtype=scale_dtype)
    else:
        codes, scales = torch.empty(n, k // 2, dtype=torch.uint8), torch.empty(k // INT4_GROUP, n, 2, dtype=scale_dtype)
    for a in range(0, n, QUANTIZE_ROWS):
        b = min(a + QUANTIZE_ROWS, n)
        if quantize == "int8":
            codes[a:b], scales[a:b] = quantize_int8(read(a, b), scale_dtype)
        else:
            block, scales[:, a:b] = quantize_int4(read(a, b), scale_dtype)
            codes[a:b] = nibbles_to_bytes(block)
    return codes, scales


def finish_load(model: nn.Module) -> None:
    """After ``load_state_dict``: put every int4 weight, loaded in the checkpoint's form, into the kernel's packed
    layout, one layer at a time."""
    for layer in model.modules():
        if isinstance(layer, Int4Linear):
            portable = layer.weight.data
            packed = int4_pack(lambda a, b, w=portable: bytes_to_nibbles(w[a:b]), portable.shape[0])
            layer.weight = nn.Parameter(packed, requires_grad=False)


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` in the checkpoint's form: int4 weights unpacked from the kernel's layout."""
    state = model.state_dict()
    for name, layer in model.named_modules():
        if isinstance(layer, Int4Linear):
            state[f"{name}.weight"] = layer.portable()
    return state
