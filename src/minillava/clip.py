"""The CLIP ViT image tower, as LLaVA uses it: it returns selected hidden states, not an embedding.

Names mirror the checkpoint's ``vision_model.*`` keys. ``post_layernorm`` and the layers after the
deepest selected one are kept (so a converted checkpoint round-trips) but never run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig
from .linear import Linear


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # OpenAI CLIP's activation; exact GELU here gives visibly different features.
    return x * torch.sigmoid(1.702 * x)


class Embeddings(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(config.num_patches + 1, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1).to(patches.dtype)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class SelfAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = d // config.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def heads(proj: Linear) -> torch.Tensor:
            return proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        y = F.scaled_dot_product_attention(
            heads(self.q_proj), heads(self.k_proj), heads(self.v_proj), scale=self.head_dim**-0.5
        )
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        if config.hidden_act != "quick_gelu":
            raise ValueError(f"unsupported CLIP activation {config.hidden_act!r}; only 'quick_gelu' is implemented")
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SelfAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))


class ClipVision(nn.Module):
    """CLIP vision transformer returning hidden states by index (0 = embeddings after ``pre_layrnorm``)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # sic: the checkpoint's name
        self.encoder = Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # kept, never run

    def forward(self, pixel_values: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """Hidden states at indices ``layers`` (negative counts from the end, -1 = last layer's output),
        concatenated on the feature axis: ``[N, 1 + patches, hidden * len(layers)]``."""
        n_states = self.config.num_layers + 1
        wanted = [i % n_states for i in layers]
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        states = {0: x} if 0 in wanted else {}
        for i, layer in enumerate(self.encoder.layers[: max(wanted)], start=1):
            x = layer(x)
            if i in wanted:
                states[i] = x
        return torch.cat([states[i] for i in wanted], dim=-1)
