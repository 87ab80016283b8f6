"""The LLaMA decoder: RMSNorm, rotary embeddings, grouped-query attention over a static KV cache.

Module names mirror the Hugging Face checkpoint names below the ``language_model.model.`` prefix, so
the key table that maps checkpoints is a list of prefixes.

Two index spaces meet here. *Slots* say where in the KV cache (:mod:`minillava.cache`) a token is written;
they are the same for every row of a batch. *Positions* (``position_ids``) are what RoPE rotates by;
for a left-padded row they start at 0 on its first real token. Prefill and one-token decode run the
same code: write the new keys at their slots, attend over the slots before ``end`` through a mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import TextConfig
from .linear import Linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, as the reference does for fp16/bf16. (The dtype test
        # skips two no-op casts per call, which matter to a small model's decode step.)
        h = x if x.dtype == torch.float32 else x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * (h if x.dtype == torch.float32 else h.to(x.dtype))


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
    # On the CPU even while a model is built on the meta device (the callers move the result): the meta kernels of
    # these ops are Python code whose first call imports torch's compiler stack, seconds of a small model's load.
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
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
        self.register_buffer("inv_freq", rope_inv_freq(config).to(torch.get_default_device()), persistent=False)
        self.register_buffer("sin_sign", _sin_sign(config.head_dim).to(torch.get_default_device()), persistent=False)

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute the buffers (they are not in checkpoints; after a meta-device load they must be rebuilt)."""
        device = device or self.inv_freq.device
        self.inv_freq = rope_inv_freq(self.config).to(device)
        self.sin_sign = _sin_sign(self.config.head_dim).to(device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if self.dynamic:
            seq_len = int(position_ids.max()) + 1
            if seq_len > self.config.max_position_embeddings:
                inv_freq = rope_inv_freq(self.config, seq_len).to(inv_freq.device)
        freqs = position_ids[..., None].float() * inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos(), angles.sin() * self.sin_sign
        # [B, 1, T, D]: broadcast over heads without a view per layer.
        if dtype != torch.float32:
            cos, sin = cos.to(dtype), sin.to(dtype)
        return cos[:, None], sin[:, None]


def _sin_sign(head_dim: int) -> torch.Tensor:
    """-1 on the first half, +1 on the second: the sign :func:`apply_rotary` folds into the sin table."""
    ones = torch.ones(head_dim // 2, device="cpu")  # on the CPU for the reason rope_inv_freq gives
    return torch.cat((-ones, ones))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x2, x1)``, written as
    ``roll(x) * cat(-s, s)``; the same operations in the same order, so the same rounding in every dtype.
    ``x``: [B, H, T, D]; ``cos``/``signed_sin``: [B, 1, T, D] from :class:`Rotary`."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class Attention(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        slots: torch.Tensor | None = None,
        end: int = 0,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend from ``x`` [B, T, D]; returns the output and, with ``need_weights``, the probabilities
        ``[B, heads, T, S]``.

        With ``kv`` (this layer's cache buffers) the new keys and values are written at ``slots`` and the
        attention reads slots ``0..end-1``; ``mask`` is then a boolean ``[B|1, 1, T, end]`` or None for plain
        causal attention.
        """
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv is not None:
            # Indexed assignment (index_put_), which a compiled graph performs in place on the cache buffers.
            kv[0][:, :, slots] = k
            kv[1][:, :, slots] = v
            k, v = kv[0][:, :, :end], kv[1][:, :, :end]
        weights = None
        if need_weights:
            y, weights = eager_attention(q, k, v, mask, self.head_dim**-0.5)
        else:
            # enable_gqa: each kv head serves a run of adjacent query heads (the reference's repeat_kv layout)
            # without copying the cache num_heads / num_kv_heads times every step.
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=mask is None and t > 1,
                scale=self.head_dim**-0.5,
                enable_gqa=self.num_kv_heads != self.num_heads,
            )
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)), weights


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention written out, for when the probabilities are wanted: scores, softmax in fp32, weighted values,
    in the order transformers' eager attention computes them (so the probabilities equal its ``attentions``)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    if mask is None:
        t, s = scores.shape[-2:]
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v), probs


class MLP(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, kv=None, slots=None, end=0, need_weights=False):
        h, weights = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, slots, end, need_weights)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), weights


def attention_mask_for(query_slots: torch.Tensor, end: int, padding: torch.Tensor | None) -> torch.Tensor:
    """Boolean ``[B|1, 1, T, end]`` mask: each query sees the slots up to its own, minus padded ones.

    ``padding`` is ``[B, end]`` with True on real tokens, or None. A query always sees its own slot, so a
    padding row attends to itself and never produces NaN.
    """
    slots = torch.arange(end, device=query_slots.device)
    mask = slots[None, :] <= query_slots[:, None]  # [T, end]
    if padding is None:
        return mask[None, None]
    mask = (mask & padding[:, None, :]) | (slots[None, :] == query_slots[:, None])
    return mask[:, None]


@dataclass
class DecoderOutput:
    hidden: torch.Tensor  # [B, T, D] after the final norm
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class Llama(nn.Module):
    """LLaMA decoder: ``embed_tokens``, ``layers``, ``norm`` and ``lm_head`` (``None`` when tied)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size, False)
        self.rotary = Rotary(config)

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
        end: int = 0,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> DecoderOutput:
        """Run the blocks on embeddings ``x`` [B, T, D].

        Args:
            position_ids: [B, T] RoPE positions.
            mask: boolean ``[B|1, 1, T, S]`` (see :func:`attention_mask_for`), or None for plain causal attention
                over the T tokens (or, for one query, over every slot).
            cache: the KV cache; the tokens are written at ``slots`` ([T]) and attention reads slots ``0..end-1``.
            output_hidden_states: also return the input of every block and the final normed output
                (transformers' convention: ``num_layers + 1`` tensors, the last one after the norm).
            output_attentions: also return every layer's attention probabilities (explicit attention path).
        """
        cos, sin = self.rotary(position_ids, x.dtype)
        hidden_states = [] if output_hidden_states else None
        attentions = [] if output_attentions else None
        for i, layer in enumerate(self.layers):
            if hidden_states is not None:
                hidden_states.append(x)
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            x, weights = layer(x, cos, sin, mask, kv, slots, end, output_attentions)
            if attentions is not None:
                attentions.append(weights)
        x = self.norm(x)
        if hidden_states is not None:
            hidden_states.append(x)
        return DecoderOutput(
            x,
            None if hidden_states is None else tuple(hidden_states),
            None if attentions is None else tuple(attentions),
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # Through the module, not its weight: a quantised lm_head is a different layer with the same call.
        return F.linear(hidden, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(hidden)
