"""``Llava``: a CLIP tower, a projector and a LLaMA decoder, called in that order.

:meth:`Llava.forward` is the one entry point everything runs through (generation, chat, training, the parity
tests); :meth:`Llava.decode_step` is its static one-token form for compiled decoding. Both plan positions and
masks here and hand the decoder the same arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import anyres
from .cache import KVCache
from .clip import ClipVision
from .config import LlavaConfig
from .fusion import embed_with_images
from .llama import Llama, attention_mask_for
from .projector import Projector

IGNORE_INDEX = -100
"""Label of a position that is not supervised (prompt, image placeholder, padding)."""


@dataclass
class LlavaOutput:
    """What :meth:`Llava.forward` returns; a field is None unless it was asked for (or, for ``loss`` and
    ``image_features``, unless labels or images were given).

    Attributes:
        logits: ``[B, T, vocab]`` (``[B, logits_to_keep, vocab]`` when set).
        loss: mean next-token cross-entropy over supervised tokens.
        past_key_values: the :class:`~minillava.cache.KVCache` holding every token fed so far.
        hidden_states: ``num_layers + 1`` tensors ``[B, T, D]``: the input embeddings, the output of each block
            but the last, and the last block's output after the final norm (``lm_head(hidden_states[-1])`` is the
            logits).
        attentions: per layer ``[B, heads, T, S]`` softmax probabilities over the ``S`` slots attended.
        image_features: ``[N, K, D]`` projector rows of the images given (for LLaVA-1.6 tiles, a list of each
            image's ``[K_i, D]`` rows after the merge).
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    past_key_values: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    image_features: torch.Tensor | list[torch.Tensor] | None = None


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions for a (left- or right-) padded batch: the first real token of each row is 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy in fp32: logits at t predict labels at t+1; ``-100`` is ignored.

    ``reduction="mean"`` averages over supervised tokens (transformers' loss); ``"sum"`` adds them up, for
    callers that divide by a token count of their own (a global batch split over processes or micro-batches).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1).to(logits.device),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


class Llava(nn.Module):
    """LLaVA: ``vision`` (CLIP ViT), ``projector`` (MLP) and ``llm`` (LLaMA), as plain fields."""

    def __init__(self, config: LlavaConfig) -> None:
        super().__init__()
        self.config = config
        self.vision = ClipVision(config.vision)
        feature_size = config.vision.hidden_size * len(config.feature_layers)
        self.projector = Projector(
            config.projector_type, feature_size, config.text.hidden_size, bias=config.projector_bias
        )
        self.llm = Llama(config.text)
        # LLaVA-1.6: the vector that ends every row of an image's tile map.
        newline = config.anyres is not None and config.anyres.newline
        self.image_newline = nn.Parameter(torch.empty(config.text.hidden_size)) if newline else None

    def encode_images(
        self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None
    ) -> torch.Tensor | list[torch.Tensor]:
        """``[N, 3, S, S]`` pixels -> ``[N, K, D]`` decoder rows (K = ``config.num_image_tokens``).

        LLaVA-1.6 tiles ``[N, T, 3, S, S]`` with ``image_sizes`` ``[N, 2]`` (height, width) -> a list of ``[K_i, D]``,
        one per image (see :mod:`minillava.anyres`; tiles past an image's own count are padding and never run).
        """
        if image_sizes is not None or pixel_values.dim() == 5:
            grid = self.config.anyres
            if grid is None:
                raise ValueError(
                    "pixel_values [N, tiles, 3, S, S] with image_sizes are LLaVA-1.6 (anyres) inputs, but this model "
                    "has no grid_pinpoints; pass [N, 3, S, S] images from its own processor"
                )
            tile = self.config.vision.image_size
            tiles, counts = anyres.real_tiles(pixel_values, image_sizes, grid.grid_pinpoints, tile)
            rows = self.encode_images(tiles).split(counts)
            return anyres.merge_images(
                rows,
                image_sizes,
                pinpoints=grid.grid_pinpoints,
                tile=tile,
                merge=grid.merge,
                rounding=grid.unpad_rounding,
                newline=self.image_newline,
            )
        size = self.config.vision.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (self.config.vision.num_channels, size, size):
            raise ValueError(
                f"pixel_values must be [N, {self.config.vision.num_channels}, {size}, {size}], "
                f"got {list(pixel_values.shape)}"
            )
        features = self.vision(pixel_values, self.config.feature_layers)
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]  # drop the class-token row
        return self.projector(features)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with the image rows spliced in at the placeholder positions: what ``forward``
        takes as ``inputs_embeds``."""
        rows = None if pixel_values is None else self.encode_images(pixel_values, image_sizes)
        return embed_with_images(self.llm.embed_tokens, input_ids, rows, self.config.image_token_id)

    def new_cache(
        self, batch: int, max_len: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> KVCache:
        """An empty KV cache of ``max_len`` slots for ``batch`` rows (default: the decoder weights' dtype and
        device)."""
        ref = self.llm.embed_tokens.weight
        c = self.config.text
        return KVCache.empty(
            c.num_layers, batch, c.num_kv_heads, max_len, c.head_dim, dtype or ref.dtype, device or ref.device
        )

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        logits_to_keep: int = 0,
        image_sizes: torch.Tensor | None = None,
    ) -> LlavaOutput:
        """Logits for ``input_ids`` (or ``inputs_embeds``), optionally continuing a KV cache.

        Args:
            input_ids: [B, T], with K placeholders of ``config.image_token_id`` per image.
            pixel_values: [N, 3, S, S], images in placeholder order across the batch (with ``input_ids`` only);
                LLaVA-1.6 tiles [N, T, 3, S, S] come with ``image_sizes``.
            attention_mask: 1 for real tokens, 0 for padding. Without a cache [B, T]; with one, as transformers,
                [B, past + T] over every token so far.
            labels: [B, T] token ids to predict, ``-100`` where nothing is supervised (shifted inside).
            inputs_embeds: [B, T, D] instead of ``input_ids``, e.g. from :meth:`embed`.
            position_ids: [B, T] RoPE positions; default: each row's count of real tokens before the token.
            past_key_values: a :class:`~minillava.cache.KVCache` holding earlier tokens; the new ones are written
                after them (the cache grows if it is full).
            use_cache: return the cache in ``past_key_values`` (a new one if none was given).
            output_hidden_states, output_attentions: also return these (see :class:`LlavaOutput`); attentions
                take an explicit attention path, SDPA otherwise.
            logits_to_keep: compute logits only for the last this-many positions (0 = all).
            image_sizes: [N, 2] (height, width) of each LLaVA-1.6 image, as the processor returns it.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        image_features = None
        if inputs_embeds is None:
            if pixel_values is not None:
                image_features = self.encode_images(pixel_values, image_sizes)
            inputs_embeds = embed_with_images(
                self.llm.embed_tokens, input_ids, image_features, self.config.image_token_id
            )
        elif pixel_values is not None:
            raise ValueError(
                "pixel_values go with input_ids; inputs_embeds already hold the image rows (see model.embed)"
            )
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[1] == 0:
            raise ValueError(f"inputs must be [batch, length(, dim)] with length >= 1, got {list(inputs_embeds.shape)}")
        batch, length = inputs_embeds.shape[:2]
        cache = past_key_values
        if cache is None and use_cache:
            cache = self.new_cache(batch, length, dtype=inputs_embeds.dtype, device=inputs_embeds.device)
        if cache is not None and cache.batch != batch:
            raise ValueError(f"the KV cache has {cache.batch} rows but the inputs have {batch}")

        if cache is None:
            start = 0
            padding = None
            if attention_mask is not None:
                if tuple(attention_mask.shape) != (batch, length):
                    raise ValueError(f"attention_mask must be [{batch}, {length}], got {list(attention_mask.shape)}")
                if not bool(attention_mask.bool().all()):
                    padding = attention_mask.to(inputs_embeds.device).bool()
        else:
            start = cache.filled
            cache.grow(start + length)
            cache.mark(attention_mask, length)
            padding = cache.mask[:, : start + length] if cache.padded else None
        end = start + length
        if position_ids is None:
            if padding is None:
                position_ids = torch.arange(start, end, device=inputs_embeds.device).expand(batch, length)
            else:
                position_ids = positions_from_mask(padding)[:, start:]
        query_slots = torch.arange(start, end, device=inputs_embeds.device)
        mask = None
        if padding is not None or output_attentions or (start > 0 and length > 1):
            mask = attention_mask_for(query_slots, end, padding)

        try:
            out = self.llm(
                inputs_embeds,
                position_ids,
                mask,
                cache,
                query_slots,
                end,
                output_hidden_states=output_hidden_states,
                output_attentions=output_attentions,
            )
        except BaseException:
            if cache is not None:
                cache.mask[:, start:] = False  # nothing new was kept
            raise
        if cache is not None:
            cache.filled = end

        hidden = out.hidden[:, -logits_to_keep:] if logits_to_keep else out.hidden
        logits = self.llm.logits(hidden)
        loss = None
        if labels is not None:
            if logits_to_keep:
                raise ValueError("labels need logits for every position; leave logits_to_keep at 0")
            loss = causal_lm_loss(logits, labels)
        return LlavaOutput(
            logits=logits,
            loss=loss,
            past_key_values=cache if (use_cache or past_key_values is not None) else None,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            image_features=image_features,
        )

    def decode_step(self, tokens: torch.Tensor, input_pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token per row at cache slot ``input_pos``: ``tokens`` [B, 1], ``input_pos`` a [1] long tensor on
        the cache's device; returns the next-token logits ``[B, vocab]``.

        The static form of a one-token ``forward``: every shape is fixed by the cache, attention reads the whole
        buffer through a mask computed from tensors, and nothing is read back to the host, so
        ``torch.compile(model.decode_step, fullgraph=True)`` compiles it into one graph for every step. The slot
        is marked real and written; advancing the host count :attr:`KVCache.filled` is the caller's job (outside
        the compiled function).
        """
        cache.mask[:, input_pos] = True
        positions = cache.mask.sum(dim=-1, keepdim=True) - 1  # this row's real tokens before this one
        slots = torch.arange(cache.max_len, device=input_pos.device)
        mask = (cache.mask & (slots <= input_pos))[:, None, None, :]
        out = self.llm(self.llm.embed_tokens(tokens), positions, mask, cache, input_pos, cache.max_len)
        return self.llm.logits(out.hidden[:, -1])
