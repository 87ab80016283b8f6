"""LLaVA-1.6 ("anyres") geometry, shared by preprocessing and the model.

An image is fitted into the best of a few canvases (the "grid pinpoints", multiples of the tile size), padded,
and cut into tiles; a plain resize of the whole image (the "base" tile) goes first. The tower encodes every tile;
the model keeps the base tile's rows as they are and lays the grid tiles' rows out as one feature map, crops the
rows or columns that only saw padding ("unpad"), and ends every row of the map with a learned newline vector.

Every size here is ``(height, width)``, the order of ``image_sizes`` and of the pinpoints in a minillava config.
Original LLaVA writes its pinpoints as ``(width, height)``; the converter swaps each pair and keeps the list's
order, because that order breaks ties between canvases (see ``docs/llava-next.md``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

MERGE_TYPES = ("spatial_unpad", "flat")
UNPAD_ROUNDINGS = ("round", "truncate")

Size = tuple[int, int]


def best_resolution(height: int, width: int, pinpoints: Sequence[Size]) -> Size:
    """The canvas ``(height, width)`` an image is fitted into: the most image pixels kept after fitting, then the
    least canvas wasted; the first of equal candidates wins (so the list's order matters on ties)."""
    if height < 1 or width < 1:
        raise ValueError(f"an image size must be a positive (height, width), got ({height}, {width})")
    best = None
    best_kept, best_waste = 0, math.inf
    for canvas_h, canvas_w in pinpoints:
        scale = min(canvas_w / width, canvas_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = canvas_w * canvas_h - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (canvas_h, canvas_w), kept, waste
    if best is None:
        raise ValueError("no grid pinpoints given")
    return best


def fitted_size(height: int, width: int, canvas: Size) -> Size:
    """``(height, width)`` of the image resized to fit ``canvas`` with its aspect ratio (rounded up, capped)."""
    canvas_h, canvas_w = canvas
    scale_w, scale_h = canvas_w / width, canvas_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), canvas_h), canvas_w
    return canvas_h, min(math.ceil(width * scale_h), canvas_w)


def grid_shape(height: int, width: int, pinpoints: Sequence[Size], tile: int) -> Size:
    """``(rows, cols)`` of grid tiles for an image of this size."""
    canvas_h, canvas_w = best_resolution(height, width, pinpoints)
    return canvas_h // tile, canvas_w // tile


def num_tiles(height: int, width: int, pinpoints: Sequence[Size], tile: int) -> int:
    """Tiles the tower encodes for one image: the base tile plus the grid."""
    rows, cols = grid_shape(height, width, pinpoints, tile)
    return 1 + rows * cols


def unpadded_shape(height: int, width: int, map_h: int, map_w: int, rounding: str) -> tuple[int, int, int, int]:
    """Which part of a ``map_h`` x ``map_w`` feature map covers the image rather than its padding.

    Returns ``(top, bottom, left, right)``: the kept rows are ``top:bottom``, the kept columns ``left:right``.
    The image's extent in map cells is ``height * (map_w / width)`` (or the same for the width), floored: with
    ``rounding="round"`` after rounding to 7 decimals (transformers), with ``"truncate"`` as is (original LLaVA).
    The two differ where the division lands just under an integer, e.g. 110 x 352 on a 24 x 48 map: 14.999... .
    """
    if width / height > map_w / map_h:
        extent = _cells(height * (map_w / width), rounding)
        pad = (map_h - extent) // 2
        return pad, map_h - pad, 0, map_w
    extent = _cells(width * (map_h / height), rounding)
    pad = (map_w - extent) // 2
    return 0, map_h, pad, map_w - pad


def _cells(x: float, rounding: str) -> int:
    if rounding == "round":
        return int(round(x, 7))
    if rounding == "truncate":
        return int(x)
    raise ValueError(f"unpad rounding must be one of {', '.join(UNPAD_ROUNDINGS)}, got {rounding!r}")


def num_features(
    height: int,
    width: int,
    *,
    pinpoints: Sequence[Size],
    tile: int,
    side: int,
    rows_per_tile: int,
    merge: str,
    rounding: str,
) -> int:
    """The rows one image becomes: how many placeholders its ``<image>`` expands to.

    ``side`` is the tower's patch grid side (``tile // patch``), ``rows_per_tile`` the projector rows per tile
    (``side * side``, plus one with the class token kept). ``spatial_unpad``: the base tile's rows, then the
    unpadded map with one newline per map row. ``flat``: every tile's rows in a row.
    """
    rows, cols = grid_shape(height, width, pinpoints, tile)
    if merge == "flat":
        return (1 + rows * cols) * rows_per_tile
    if merge != "spatial_unpad":
        raise ValueError(f"merge type must be one of {', '.join(MERGE_TYPES)}, got {merge!r}")
    top, bottom, left, right = unpadded_shape(height, width, rows * side, cols * side, rounding)
    return rows_per_tile + (bottom - top) * (right - left + 1)


def merge_features(
    features: torch.Tensor,
    height: int,
    width: int,
    *,
    pinpoints: Sequence[Size],
    tile: int,
    merge: str,
    rounding: str,
    newline: torch.Tensor | None,
) -> torch.Tensor:
    """One image's projector rows ``[tiles, rows_per_tile, D]`` (base tile first) -> its ``[K, D]`` decoder rows.

    Rows are only moved, never combined, so the result is bit-identical whatever the dtype.
    """
    if merge == "flat":
        return features.reshape(-1, features.shape[-1])
    if newline is None:
        raise ValueError("the spatial_unpad merge needs the image_newline parameter")
    base, grid = features[0], features[1:]
    rows, cols = grid_shape(height, width, pinpoints, tile)
    dim = features.shape[-1]
    side = math.isqrt(grid.shape[1])
    if side * side != grid.shape[1] or rows * cols != grid.shape[0]:
        raise ValueError(
            f"an image of {height}x{width} needs {rows}x{cols} grid tiles of a square patch grid; "
            f"got {grid.shape[0]} tiles of {grid.shape[1]} rows"
        )
    # [rows, cols, side, side, D] -> one map [rows*side, cols*side, D], tiles placed row-major.
    feature_map = grid.view(rows, cols, side, side, dim).permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, dim)
    top, bottom, left, right = unpadded_shape(height, width, rows * side, cols * side, rounding)
    feature_map = feature_map[top:bottom, left:right]
    ends = newline.to(feature_map.dtype).expand(feature_map.shape[0], 1, dim)
    return torch.cat([base, torch.cat([feature_map, ends], dim=1).reshape(-1, dim)])


def real_tiles(
    pixel_values: torch.Tensor, image_sizes: torch.Tensor | None, pinpoints: Sequence[Size], tile: int
) -> tuple[torch.Tensor, list[int]]:
    """Each image's own tiles from padded ``[N, T, 3, S, S]`` pixels, as one ``[sum T_i, 3, S, S]`` batch, and the
    ``T_i``; the count follows from the image's size, so padding tiles are dropped unread."""
    if image_sizes is None or pixel_values.dim() != 5:
        raise ValueError(
            "LLaVA-1.6 images need both pixel_values [N, tiles, 3, S, S] and image_sizes [N, 2] (height, width), as "
            f"the processor returns them; got pixel_values {list(pixel_values.shape)} and "
            f"image_sizes {None if image_sizes is None else list(image_sizes.shape)}"
        )
    if image_sizes.shape != (pixel_values.shape[0], 2):
        raise ValueError(
            f"image_sizes must be [N, 2] (height, width) for the {pixel_values.shape[0]} images in pixel_values, "
            f"got {list(image_sizes.shape)}"
        )
    counts = [num_tiles(h, w, pinpoints, tile) for h, w in image_sizes.tolist()]
    if max(counts, default=0) > pixel_values.shape[1]:
        raise ValueError(
            f"image_sizes {image_sizes.tolist()} need {counts} tiles but pixel_values holds {pixel_values.shape[1]} "
            "per image; were the images preprocessed with other grid pinpoints?"
        )
    return torch.cat([pixel_values[i, :n] for i, n in enumerate(counts)]), counts


def merge_images(rows: Sequence[torch.Tensor], image_sizes: torch.Tensor, **settings) -> list[torch.Tensor]:
    """:func:`merge_features` for each image's ``[T_i, rows_per_tile, D]`` projector rows; ``settings`` are its
    keyword arguments (pinpoints, tile, merge, rounding, newline)."""
    return [
        merge_features(features, height, width, **settings)
        for features, (height, width) in zip(rows, image_sizes.tolist(), strict=True)
    ]


def check_pinpoints(pinpoints: object, tile: int, where: str = "grid_pinpoints") -> tuple[Size, ...]:
    """Check pinpoints (a list of ``[height, width]`` pairs, positive multiples of ``tile``); return them as tuples."""
    if isinstance(pinpoints, (str, bytes)) or not isinstance(pinpoints, Sequence) or not pinpoints:
        raise ValueError(f"{where} must be a non-empty list of [height, width] pairs, got {pinpoints!r}")
    out = []
    for pair in pinpoints:
        if (
            not isinstance(pair, Sequence)
            or len(pair) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in pair)
        ):
            raise ValueError(f"{where}: {pair!r} is not a [height, width] pair of positive integers")
        if pair[0] % tile or pair[1] % tile:
            raise ValueError(
                f"{where}: {list(pair)} is not a multiple of the {tile}-pixel tile; every canvas must hold whole tiles"
            )
        out.append((int(pair[0]), int(pair[1])))
    return tuple(out)
