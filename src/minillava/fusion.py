"""The splice: image rows replace the placeholder rows of the token embeddings, in order."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


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
    rows, described = _flat_rows(image_rows)
    is_image = input_ids == image_token_id
    n_placeholders = int(is_image.sum())
    n_rows = 0 if rows is None else rows.shape[0]
    if n_placeholders != n_rows:
        raise ValueError(
            f"input_ids hold {n_placeholders} image placeholders (id {image_token_id}) but the images give "
            f"{n_rows} feature rows{described}; each image needs exactly its K placeholders"
        )
    embeds = embed_tokens(input_ids.masked_fill(is_image, 0))
    if rows is None:
        return embeds
    return embeds.masked_scatter(is_image[..., None], rows.to(embeds.dtype))


def _flat_rows(image_rows: torch.Tensor | Sequence[torch.Tensor] | None) -> tuple[torch.Tensor | None, str]:
    """All image rows as one ``[R, D]`` tensor (``None`` for no images), and how errors describe them."""
    if image_rows is None:
        return None, ""
    if isinstance(image_rows, torch.Tensor):
        return image_rows.reshape(
            -1, image_rows.shape[-1]
        ), f" ({image_rows.shape[0]} images x {image_rows.shape[1]} rows)"
    counts = [rows.shape[0] for rows in image_rows]
    if not counts:
        return None, ""
    return torch.cat(list(image_rows)), f" ({len(counts)} images of {', '.join(map(str, counts))} rows)"
