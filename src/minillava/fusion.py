"""The splice: image rows replace the placeholder rows of the token embeddings, in order."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .image import check_image_count


def embed_with_images(
    embed_tokens: nn.Embedding,
    input_ids: torch.Tensor,
    image_rows: torch.Tensor | Sequence[torch.Tensor] | None,
    image_token_id: int,
) -> torch.Tensor:
    """Embed ``input_ids`` [B, T] and overwrite each ``image_token_id`` position with the next image row.

    ``image_rows`` is ``[N, K, D]``: N images in the order their placeholders appear (row-major over
    the batch), K rows each; or a list of ``[K_i, D]``, one per image, when images differ in rows
    (LLaVA-1.6). Placeholder ids are never looked up, so the id may lie outside the vocabulary.
    """
    is_image = input_ids == image_token_id
    if isinstance(image_rows, (list, tuple)):
        images, per_image = len(image_rows), [rows.shape[0] for rows in image_rows]
        image_rows = torch.cat(list(image_rows)) if image_rows else None
    else:
        images, per_image = (0, 1) if image_rows is None else image_rows.shape[:2]
    check_image_count(int(is_image.sum()), images, per_image=per_image, placeholder_id=image_token_id)
    embeds = embed_tokens(input_ids.masked_fill(is_image, 0))
    if image_rows is None:
        return embeds
    rows = image_rows.reshape(-1, image_rows.shape[-1]).to(embeds.dtype)
    return embeds.masked_scatter(is_image[..., None], rows)
