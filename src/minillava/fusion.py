"""The splice: image rows replace the placeholder rows of the token embeddings, in order."""

from __future__ import annotations

import torch
from torch import nn


def embed_with_images(
    embed_tokens: nn.Embedding,
    input_ids: torch.Tensor,
    image_rows: torch.Tensor | None,
    image_token_id: int,
) -> torch.Tensor:
    """Embed ``input_ids`` [B, T] and overwrite each ``image_token_id`` position with the next image row.

    ``image_rows`` is ``[N, K, D]``: N images in the order their placeholders appear (row-major over
    the batch), K rows each. Placeholder ids are never looked up, so the id may lie outside the
    vocabulary.
    """
    is_image = input_ids == image_token_id
    n_placeholders = int(is_image.sum())
    n_rows = 0 if image_rows is None else image_rows.shape[0] * image_rows.shape[1]
    if n_placeholders != n_rows:
        images = 0 if image_rows is None else image_rows.shape[0]
        per_image = "" if image_rows is None else f" ({images} images x {image_rows.shape[1]} rows)"
        raise ValueError(
            f"input_ids hold {n_placeholders} image placeholders (id {image_token_id}) but the images give "
            f"{n_rows} feature rows{per_image}; each image needs exactly its K placeholders"
        )
    embeds = embed_tokens(input_ids.masked_fill(is_image, 0))
    if image_rows is None:
        return embeds
    rows = image_rows.reshape(-1, image_rows.shape[-1]).to(embeds.dtype)
    return embeds.masked_scatter(is_image[..., None], rows)
