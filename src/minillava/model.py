"""``Llava``: a CLIP tower, a projector and a LLaMA decoder, called in that order."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import anyres
from .clip import ClipVision
from .config import LlavaConfig
from .fusion import embed_with_images
from .llama import Llama
from .projector import Projector

IGNORE_INDEX = -100


@dataclass
class LlavaOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions for a (left- or right-) padded batch: the first real token of each row is 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in fp32: logits at t predict labels at t+1; ``-100`` is ignored;
    mean over supervised tokens."""
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1).to(logits.device),
        ignore_index=IGNORE_INDEX,
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
            tiles, counts = anyres.real_tiles(pixel_values, image_sizes, self.config)
            rows = self.encode_images(tiles).split(counts)
            return anyres.merge_images(rows, image_sizes, self.config, self.image_newline)
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
        """Token embeddings with the image rows spliced in at the placeholder positions."""
        rows = None if pixel_values is None else self.encode_images(pixel_values, image_sizes)
        return embed_with_images(self.llm.embed_tokens, input_ids, rows, self.config.image_token_id)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        image_sizes: torch.Tensor | None = None,
    ) -> LlavaOutput:
        """Logits ``[B, T, vocab]`` (and ``loss`` when ``labels`` are given).

        Args:
            input_ids: [B, T], with K placeholders of ``config.image_token_id`` per image.
            pixel_values: [N, 3, S, S], images in placeholder order across the batch; LLaVA-1.6 tiles
                [N, T, 3, S, S] come with ``image_sizes``.
            attention_mask: 1 for real tokens. Without the cache [B, T]; with it, [B, S] over every
                slot so far (S >= last slot + 1), as generation keeps it.
            labels: [B, T] token ids to predict, ``-100`` where nothing is supervised (shifted inside).
            position_ids: [B, T] RoPE positions; default: from ``attention_mask`` (first real token at 0).
            input_pos: [T] KV-cache slots of these tokens (see ``setup_cache``); None runs uncached.
            logits_to_keep: compute logits only for the last this-many positions (0 = all).
            image_sizes: [N, 2] (height, width) of each LLaVA-1.6 image, as the processor returns it.
        """
        embeds = self.embed(input_ids, pixel_values, image_sizes)
        if position_ids is None:
            if attention_mask is not None:
                position_ids = positions_from_mask(attention_mask)
                if input_pos is not None:
                    position_ids = position_ids[:, input_pos]
            else:
                slots = torch.arange(input_ids.shape[1], device=input_ids.device) if input_pos is None else input_pos
                position_ids = slots.expand_as(input_ids)
        hidden = self.llm(embeds, position_ids, attention_mask, input_pos)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.llm.logits(hidden)
        loss = None
        if labels is not None:
            if logits_to_keep:
                raise ValueError("labels need logits for every position; leave logits_to_keep at 0")
            loss = causal_lm_loss(logits, labels)
        return LlavaOutput(logits=logits, loss=loss)

    def setup_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None, device=None) -> None:
        """Allocate the decoder's KV cache: ``max_len`` slots for each of ``batch`` rows."""
        self.llm.setup_cache(batch, max_len, dtype, device)

    def clear_cache(self) -> None:
        self.llm.clear_cache()
