"""The multimodal projector: image features -> decoder embedding rows."""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from .config import projector_depth
from .linear import Linear


class Projector(nn.Module):
    """``linear`` (one Linear), ``mlpNx_gelu`` (N Linears with exact-erf GELU between) or ``identity``.

    ``layers[i]`` is the i-th Linear: HF's ``linear_{i+1}``, the original's ``mm_projector.{2i}``.
    """

    def __init__(self, projector_type: str, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        depth = projector_depth(projector_type)
        if depth == 0 and in_features != out_features:
            raise ValueError(
                f"an identity projector needs equal widths, got vision features {in_features} "
                f"and decoder hidden size {out_features}"
            )
        sizes = [in_features] + [out_features] * depth
        self.layers = nn.ModuleList(Linear(a, b, bias=bias) for a, b in pairwise(sizes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layers:
            # A tower kept in another dtype (fp32 CLIP under an fp16 decoder) hands over in the projector's dtype.
            x = x.to(self.layers[0].weight.dtype)
        for i, layer in enumerate(self.layers):
            if i:
                x = F.gelu(x)
            x = layer(x)
        return x
