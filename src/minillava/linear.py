"""The model's linear layer: ``nn.Linear`` with a faster path for bf16/fp16 on CPUs without half-precision GEMMs.

On a CPU without native bf16 (or fp16) matrix instructions (oneDNN refuses them, e.g. AVX2-only x86), torch's
fallback half-precision GEMM runs several times slower than its fp32 GEMM (512x4096 @ 4096x11008 in bf16: 5.6x
slower than fp32 on a Zen 3). A product of many rows (a prefill, an image through CLIP) therefore upcasts the
weight a tile of output rows at a time and runs the fp32 GEMM on it, rounding the result back: the same products
summed in fp32, as torch's own bf16 GEMM does, only in another order. One tile buffer is reused, so the extra
memory is one tile. Few-row products (decode) and anything that needs gradients keep ``F.linear``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

TILE_BYTES = 16 * 2**20
"""Bytes of one upcast (or dequantised) weight tile: about what stays in cache while the GEMM reads it."""

TILE_ROWS = 256
"""Tiles start at multiples of this many rows (the int4 kernel's packed layout needs it, see ``quant``)."""

TILED_MIN_ROWS = 16
"""Products of fewer rows than this keep ``F.linear``: upcasting a tile costs a pass over the weight, which only
many rows pay back."""


@functools.cache
def gemm_dtype(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype a many-row product of ``dtype`` inputs runs in: ``dtype`` itself, except bf16 / fp16 on a CPU
    whose oneDNN does not support them, where it is fp32."""
    if device_type != "cpu":
        return dtype
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.float32
    if dtype == torch.float16 and not torch.ops.mkldnn._is_mkldnn_fp16_supported():
        return torch.float32
    return dtype


def tiled_linear(
    x: torch.Tensor,
    out_features: int,
    weight_rows: Callable[[int, int, torch.Tensor], torch.Tensor],
    bias: torch.Tensor | None = None,
    column_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(x @ W.T) * column_scale + bias`` for ``x`` ``[M, K]``, computed in :func:`gemm_dtype` over tiles of ``W``'s
    output rows and rounded to ``x``'s dtype once at the end.

    ``weight_rows(start, stop, tile)`` writes rows ``start:stop`` of ``W`` into ``tile`` (``[stop - start, K]``
    in the GEMM dtype, one buffer reused for every tile) and returns it (or another tensor holding them)."""
    dtype = gemm_dtype(x.dtype, x.device.type)
    xc = x.to(dtype)
    rows = max(TILE_ROWS, TILE_BYTES // (x.shape[1] * dtype.itemsize) // TILE_ROWS * TILE_ROWS)
    tile = torch.empty(min(rows, out_features), x.shape[1], dtype=dtype, device=x.device)
    out = torch.empty(x.shape[0], out_features, dtype=dtype, device=x.device)
    for a in range(0, out_features, rows):
        b = min(a + rows, out_features)
        torch.mm(xc, weight_rows(a, b, tile[: b - a]).t(), out=out[:, a:b])
    if column_scale is not None:
        out.mul_(column_scale.to(dtype))
    if bias is not None:
        out.add_(bias.to(dtype))
    return out.to(x.dtype)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) whose many-row bf16/fp16 products without gradients run
    over upcast weight tiles where the CPU has no half-precision GEMM (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if (
            rows < TILED_MIN_ROWS
            or torch.is_grad_enabled()
            or gemm_dtype(x.dtype, x.device.type) == x.dtype
            or x.dtype != self.weight.dtype
        ):
            return F.linear(x, self.weight, self.bias)
        upcast = lambda a, b, tile: tile.copy_(self.weight[a:b])  # noqa: E731
        # torch's linear adds the bias inside the GEMM (one rounding) for 2-D and contiguous 3-D inputs and after it
        # otherwise (a second rounding); the same here, so half-precision results round where the reference's do.
        fused_bias = x.dim() == 2 or (x.dim() == 3 and x.is_contiguous())
        y = tiled_linear(x.reshape(rows, -1), self.out_features, upcast, self.bias if fused_bias else None)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if fused_bias or self.bias is None else y + self.bias
