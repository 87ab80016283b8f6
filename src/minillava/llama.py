"""The LLaMA decoder: RMSNorm, rotary embeddings, grouped-query attention with a static KV cache.

Module names mirror the Hugging Face checkpoint names below the ``language_model.model.`` prefix, so
the key table that maps checkpoints is a list of prefixes.

Two index spaces meet here. *Slots* (``input_pos``) say where in the KV cache a token is written;
they are the same for every row of a batch. *Positions* (``position_ids``) are what RoPE rotates by;
for a left-padded row they start at 0 on its first real token. Prefill and one-token decode run the
same code: write the new keys at their slots, attend over slots ``0..input_pos[-1]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, as the reference does for fp16/bf16.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(config: TextConfig, seq_len: int | None = None) -> torch.Tensor:
    """Inverse frequencies (fp32) for the configured RoPE scaling.

    ``seq_len`` only matters for ``dynamic`` scaling, which stretches the base once a sequence
    grows past ``max_position_embeddings``.
    """
    dim = config.head_dim
    base = config.rope_theta
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "dynamic" and seq_len is not None and seq_len > config.max_position_embeddings:
        factor = scaling["factor"]
        base = base * ((factor * seq_len / config.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


class Rotary(nn.Module):
    """cos/sin tables for the half-split ("rotate_half") RoPE layout, angles computed in fp32.

    The sin table comes with the first half negated, so that :func:`apply_rotary` can rotate with one ``roll``
    instead of slicing, negating and concatenating (same values: ``(-x2) * s == x2 * (-s)`` exactly).
    """

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.dynamic = (config.rope_scaling or {}).get("rope_type") == "dynamic"
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute ``inv_freq`` (it is not in checkpoints; after a meta-device load it must be rebuilt)."""
        self.inv_freq = rope_inv_freq(self.config).to(device or self.inv_freq.device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if self.dynamic:
            seq_len = int(position_ids.max()) + 1
            if seq_len > self.config.max_position_embeddings:
                inv_freq = rope_inv_freq(self.config, seq_len).to(inv_freq.device)
        freqs = position_ids[..., None].float() * inv_freq
        cos, sin = freqs.cos(), freqs.sin()
        # [B, 1, T, D]: broadcast over heads without a view per layer.
        return torch.cat((cos, cos), dim=-1).to(dtype)[:, None], torch.cat((-sin, sin), dim=-1).to(dtype)[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x2, x1)``, written as
    ``roll(x) * cat(-s, s)``; the same operations in the same order, so the same rounding in every dtype.
    ``x``: [B, H, T, D]; ``cos``/``signed_sin``: [B, 1, T, D] from :class:`Rotary`."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class KVCache(nn.Module):
    """Preallocated keys and values, ``[batch, kv_heads, max_len, head_dim]``, written at slot indices."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(
        self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, end: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v`` at slots ``input_pos``; return the cache up to slot ``end`` (exclusive)."""
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        input_pos: torch.Tensor | None,
        end: int,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v, end)
        causal = mask is None and t > 1
        # enable_gqa: each kv head serves a run of adjacent query heads (the reference's repeat_kv layout) without
        # copying the cache num_heads / num_kv_heads times every step.
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal,
            scale=self.head_dim**-0.5,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, input_pos, end) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos, end)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask_for(input_pos: torch.Tensor, end: int, padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Boolean ``[B|1, 1, T, end]`` mask: causal over slots, minus padded slots.

    Returns ``None`` when plain causal attention (or, for one query, attention to every slot) is exact,
    so SDPA can take its fastest path. A query always sees its own slot, so a padding row attends to
    itself and never produces NaN.
    """
    t = input_pos.shape[0]
    no_padding = padding_mask is None or bool(padding_mask[:, :end].all())
    if no_padding and (t == 1 or (int(input_pos[0]) == 0 and t == end)):
        return None
    slots = torch.arange(end, device=input_pos.device)
    mask = slots[None, :] <= input_pos[:, None]  # [T, end]
    if not no_padding:
        mask = mask & padding_mask[:, None, :end].bool()
        mask = mask | (slots[None, :] == input_pos[:, None])
    return mask[:, None] if mask.dim() == 3 else mask[None, None]


class Llama(nn.Module):
    """LLaMA decoder: ``embed_tokens``, ``layers``, ``norm`` and ``lm_head`` (``None`` when tied)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, False)
        self.rotary = Rotary(config)

    def setup_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None, device=None) -> None:
        """Allocate a KV cache of ``max_len`` slots per layer (replacing any previous one)."""
        ref = self.embed_tokens.weight
        c = self.config
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(
                batch, c.num_kv_heads, max_len, c.head_dim, dtype or ref.dtype, device or ref.device
            )

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.self_attn.kv_cache = None

    @property
    def cache_len(self) -> int:
        """Slots the current cache holds, 0 without a cache."""
        cache = self.layers[0].self_attn.kv_cache if len(self.layers) else None
        return 0 if cache is None else cache.k.shape[2]

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the blocks on embeddings ``x`` [B, T, D]; returns the final-normed hidden states.

        Args:
            position_ids: [B, T] RoPE positions.
            padding_mask: [B, S] with 1 for real tokens over slots ``0..S-1`` (S >= last slot + 1), or None.
            input_pos: [T] cache slots of these tokens; None runs without the cache (slots ``0..T-1``).
        """
        t = x.shape[1]
        if input_pos is None:
            slots = torch.arange(t, device=x.device)
            end, cache_pos = t, None
        else:
            if self.cache_len == 0:
                raise ValueError("input_pos was given but no KV cache is set up; call setup_cache(batch, max_len)")
            slots, cache_pos = input_pos, input_pos
            end = int(input_pos[-1]) + 1
            if end > self.cache_len:
                raise ValueError(f"slot {end - 1} is past the KV cache's {self.cache_len} slots")
        mask = attention_mask_for(slots, end, padding_mask)
        cos, sin = self.rotary(position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache_pos, end)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight)
