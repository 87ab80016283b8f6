"""Images to ``pixel_values``, pixel-for-pixel as the reference pipelines make them.

Two modes, both ending in the CLIP transform (bicubic resize of the shortest edge, centre crop, rescale by 1/255,
normalise with the checkpoint's mean/std, channels first):

- ``crop``: the CLIP transform alone, what llava-hf's ``CLIPImageProcessor`` does; non-square images lose their
  sides.
- ``pad``: original LLaVA's ``image_aspect_ratio: pad``: paste the image centred on a square canvas filled with the
  mean colour (``int(mean * 255)`` per channel, (122, 116, 104) for CLIP), then the CLIP transform.

Files are opened with Pillow and converted with ``Image.convert("RGB")`` as original LLaVA does. Hostile inputs stop
early: a file whose header declares more than ``max_pixels`` pixels is refused before its pixels are decoded, and a
truncated or non-image file raises :class:`ImageDecodeError` naming it.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from .anyres import best_resolution, fitted_size
from .config import ImageConfig
from .tokenizer import IMAGE_MARKER

ImageInput = str | os.PathLike | bytes | bytearray | Image.Image
SINGLE_IMAGE_TYPES = (str, os.PathLike, bytes, bytearray, Image.Image)
"""What counts as one image (anything else that is a sequence is a list of images)."""

DEFAULT_MAX_PIXELS = 89_478_485
"""About 90 megapixels: Pillow's own ``MAX_IMAGE_PIXELS``. Pass ``max_pixels`` to change it (``None``: no limit)."""


class ImageDecodeError(OSError):
    """An image file that cannot be read: truncated, corrupt, or not an image."""


class ImageTooLargeError(ValueError):
    """An image (or the square/resized copy preprocessing would make of it) over the pixel limit."""


def describe(image: object) -> str:
    """How errors name an input: its path, or its type and size."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    if isinstance(image, (bytes, bytearray)):
        return f"<image bytes, {len(image)} bytes>"
    if isinstance(image, Image.Image):
        return f"<PIL.Image {image.mode} {image.width}x{image.height}>"
    return f"<{type(image).__name__}>"


def image_list(images: ImageInput | Sequence[ImageInput] | None) -> list[ImageInput]:
    """``None`` -> ``[]``, one image (path, bytes or PIL image) -> ``[image]``, a sequence of images -> a list."""
    if images is None:
        return []
    if isinstance(images, SINGLE_IMAGE_TYPES) or not isinstance(images, Sequence):
        return [images]
    return list(images)


def check_image_count(
    found: int,
    images: int,
    where: str = "",
    per_image: int | Sequence[int] = 1,
    placeholder_id: int | None = None,
) -> None:
    """Raise a ``ValueError`` naming both counts unless every image has its place: one ``<image>`` marker in the
    text per image, or (with ``placeholder_id``) ``per_image`` placeholder ids in ``input_ids`` per image (a list
    gives each image its own count, as LLaVA-1.6's tiling does).

    ``where`` starts the message (``"prompt 1: "``, ``"sample 'a': "``).
    """
    counts = [per_image] * images if isinstance(per_image, int) else list(per_image)
    if found == sum(counts):
        return
    if placeholder_id is None:
        raise ValueError(
            f"{where}{found} {IMAGE_MARKER} marker(s) but {images} image(s); write one {IMAGE_MARKER} per image, "
            "in the order of the images"
        )
    each = ""
    if images and isinstance(per_image, int):
        each = f" ({per_image} per image)"
    elif images:
        each = f" ({', '.join(map(str, counts))} in order)"
    raise ValueError(
        f"{where}input_ids hold {found} image placeholders (id {placeholder_id}) but {images} image(s) give "
        f"{sum(counts)} feature rows{each}; each image needs exactly as many placeholders as it gives rows"
    )


def _check_pixels(name: str, width: int, height: int, max_pixels: int | None, what: str) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"{name}: {what} is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}; "
            "pass a larger max_pixels (load_processor(..., max_pixels=N)) if the image is trusted"
        )


def load_image(image: ImageInput, max_pixels: int | None = DEFAULT_MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Open a path, raw bytes or a PIL image and return it decoded and converted to RGB.

    The pixel limit is checked on the header, before any pixel is decoded. ``name`` overrides how errors name
    the input.
    """
    name = name or describe(image)
    if isinstance(image, Image.Image):
        _check_pixels(name, image.width, image.height, max_pixels, "the image")
        try:
            return image.convert("RGB")
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageDecodeError(f"{name}: cannot decode the image ({err})") from err
    if isinstance(image, (bytes, bytearray)):
        source = io.BytesIO(image)
    elif isinstance(image, (str, os.PathLike)):
        source = Path(image)
        if not source.is_file():
            raise FileNotFoundError(f"{name}: no such image file")
    else:
        raise TypeError(f"an image must be a path, bytes or a PIL.Image, got {type(image).__name__}")
    try:
        with warnings.catch_warnings():
            # Our own limit applies; Pillow's warning at its (equal) default would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(source)  # reads the header only
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(
            f"{name}: refused before decoding: {err} If the image is trusted, raise PIL.Image.MAX_IMAGE_PIXELS too"
        ) from err
    except Image.UnidentifiedImageError as err:
        raise ImageDecodeError(f"{name}: not an image file Pillow can read") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError(f"{name}: cannot read the image header ({err})") from err
    with opened:
        _check_pixels(name, opened.width, opened.height, max_pixels, "the image")
        try:
            opened.load()
            return opened.convert("RGB")
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise ImageDecodeError(
                f"{name}: cannot decode the image; the file is truncated or corrupt ({err})"
            ) from err


def expand_to_square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """Original LLaVA's ``expand2square``: paste centred on a square canvas of ``background``."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0))
    return canvas


def resize_shortest_edge(width: int, height: int, shortest_edge: int) -> tuple[int, int]:
    """(width, height) with the short side at ``shortest_edge`` and the long side truncated, as CLIP's processor."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (shortest_edge, new_long) if width <= height else (new_long, shortest_edge)


def pixel_values(
    image: Image.Image, config: ImageConfig, max_pixels: int | None = DEFAULT_MAX_PIXELS, name: str = ""
) -> torch.Tensor:
    """One RGB image to a float32 ``[3, crop_size, crop_size]`` tensor (``crop`` and ``pad`` modes)."""
    name = name or describe(image)
    if image.mode != "RGB":
        raise ValueError(f"{name}: expected an RGB image, got mode {image.mode}; use load_image")
    if config.mode == "anyres":
        raise ValueError(f"{name}: anyres images become several tiles; use anyres_pixel_values")
    if config.mode == "pad":
        side = max(image.size)
        _check_pixels(name, side, side, max_pixels, "the padded square")
        image = expand_to_square(image, tuple(int(x * 255) for x in config.mean))
    return clip_transform(image, config, max_pixels, name)


def clip_transform(
    image: Image.Image, config: ImageConfig, max_pixels: int | None = DEFAULT_MAX_PIXELS, name: str = ""
) -> torch.Tensor:
    """CLIP's transform of one RGB image: shortest edge resized, centre crop, rescale, normalise; ``[3, S, S]``."""
    width, height = resize_shortest_edge(image.width, image.height, config.shortest_edge)
    _check_pixels(name, width, height, max_pixels, "the resized image")
    image = image.resize((width, height), resample=Image.Resampling(config.resample), reducing_gap=None)

    # uint8 HWC -> CHW, then the centre crop (zero padding where the image is smaller, as transformers does).
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(height, width, 3).permute(2, 0, 1)
    size = config.crop_size
    top, left = (height - size) // 2, (width - size) // 2
    if top >= 0 and left >= 0:
        pixels = pixels[:, top : top + size, left : left + size]
    else:
        padded_h, padded_w = max(size, height), max(size, width)
        pad_top, pad_left = -(-(padded_h - height) // 2), -(-(padded_w - width) // 2)
        canvas = torch.zeros((3, padded_h, padded_w), dtype=torch.uint8)
        canvas[:, pad_top : pad_top + height, pad_left : pad_left + width] = pixels
        top, left = top + pad_top, left + pad_left
        pixels = canvas[:, max(0, top) : top + size, max(0, left) : left + size]

    # Rescale in float64 then cast, normalise in float32: the reference's exact order of roundings.
    scaled = (pixels.to(torch.float64) * config.rescale_factor).to(torch.float32)
    mean = torch.tensor(config.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(config.std, dtype=torch.float32).view(3, 1, 1)
    return ((scaled - mean) / std).contiguous()


def anyres_pixel_values(
    image: Image.Image,
    config: ImageConfig,
    pinpoints: Sequence[tuple[int, int]],
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    name: str = "",
) -> torch.Tensor:
    """One RGB image to its LLaVA-1.6 tiles, float32 ``[1 + rows * cols, 3, S, S]``: the whole image resized to
    ``shortest_edge`` squared (aspect ratio not kept), then the grid tiles row by row.

    The grid: the image is resized (bicubic, aspect ratio kept) to fit the best canvas of ``pinpoints``
    (:func:`~minillava.anyres.best_resolution`), centred on a black canvas (an odd pixel of padding goes to the
    right or bottom) and cut into ``crop_size`` tiles. Each tile then goes through the CLIP transform.
    """
    name = name or describe(image)
    if image.mode != "RGB":
        raise ValueError(f"{name}: expected an RGB image, got mode {image.mode}; use load_image")
    resample = Image.Resampling(config.resample)
    canvas_size = best_resolution(image.height, image.width, pinpoints)
    _check_pixels(name, canvas_size[1], canvas_size[0], max_pixels, "the tile canvas")
    fit_h, fit_w = fitted_size(image.height, image.width, canvas_size)
    canvas = Image.new("RGB", (canvas_size[1], canvas_size[0]), (0, 0, 0))
    canvas.paste(
        image.resize((fit_w, fit_h), resample=resample, reducing_gap=None),
        ((canvas_size[1] - fit_w) // 2, (canvas_size[0] - fit_h) // 2),
    )
    side = config.shortest_edge
    tiles = [image.resize((side, side), resample=resample, reducing_gap=None)]
    tile = config.crop_size
    for top in range(0, canvas_size[0], tile):
        for left in range(0, canvas_size[1], tile):
            tiles.append(canvas.crop((left, top, left + tile, top + tile)))
    return torch.stack([clip_transform(t, config, max_pixels, name) for t in tiles])


def preprocess(
    images: ImageInput | Sequence[ImageInput], config: ImageConfig, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> torch.Tensor:
    """Load and preprocess images: a float32 ``[N, 3, crop_size, crop_size]`` tensor (``N`` may be 0)."""
    images = image_list(images)
    out = []
    for i, image in enumerate(images):
        name = describe(image) if len(images) == 1 else f"image {i} ({describe(image)})"
        out.append(pixel_values(load_image(image, max_pixels, name), config, max_pixels, name))
    if not out:
        return torch.empty((0, 3, config.crop_size, config.crop_size), dtype=torch.float32)
    return torch.stack(out)


def pad_tiles(stacks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-image tile stacks ``[T_i, 3, S, S]`` -> ``[N, max T_i, 3, S, S]``, zero tiles after each image's own
    (the layout transformers' ``LlavaNextImageProcessor`` returns; the model reads each image's tile count off its
    size and never looks at the padding)."""
    most = max(t.shape[0] for t in stacks)
    out = stacks[0].new_zeros((len(stacks), most, *stacks[0].shape[1:]))
    for i, t in enumerate(stacks):
        out[i, : t.shape[0]] = t
    return out


def preprocess_anyres(
    images: Sequence[ImageInput],
    config: ImageConfig,
    pinpoints: Sequence[tuple[int, int]],
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load and tile images for LLaVA-1.6: ``pixel_values`` float32 ``[N, max_tiles, 3, S, S]`` (see
    :func:`pad_tiles`) and ``image_sizes`` int64 ``[N, 2]`` as ``(height, width)``; ``N`` must be at least 1."""
    if isinstance(images, (str, os.PathLike, bytes, bytearray, Image.Image)):
        images = [images]
    if not images:
        raise ValueError("no images to preprocess")
    stacks, sizes = [], []
    for i, image in enumerate(images):
        name = describe(image) if len(images) == 1 else f"image {i} ({describe(image)})"
        rgb = load_image(image, max_pixels, name)
        stacks.append(anyres_pixel_values(rgb, config, pinpoints, max_pixels, name))
        sizes.append((rgb.height, rgb.width))
    return pad_tiles(stacks), torch.tensor(sizes, dtype=torch.int64)
