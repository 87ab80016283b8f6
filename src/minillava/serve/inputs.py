"""A checked request to model inputs: images fetched and preprocessed, the prompt rendered and tokenized, the
generation settings resolved against the checkpoint's defaults and the context window. Every problem is an
:class:`~minillava.serve.protocol.APIError` (400) that names the field.

Images come inline as ``data:`` URLs. ``http(s)`` URLs are fetched only when the server was started with
``--allow-remote-images``; local paths and ``file:`` URLs are never read.
"""

from __future__ import annotations

import base64
import binascii
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit

import torch

from ..generate import GenerationConfig
from ..image import ImageDecodeError, ImageTooLargeError, check_image_count, pad_tiles
from ..pipeline import Pipeline
from ..textrow import TextRow
from ..tokenizer import IMAGE_MARKER
from .protocol import ChatRequest, ImageRef, invalid

MAX_IMAGE_BYTES = 32 * 1024 * 1024
"""The most bytes a remote image may have (an inline one is bounded by the request size)."""

FETCH_TIMEOUT_S = 10.0


@dataclass
class Prepared:
    """What the scheduler needs for one request (``image_sizes`` for LLaVA-1.6 tiles, else None)."""

    ids: list[int]
    pixel_values: torch.Tensor | None
    image_sizes: torch.Tensor | None
    config: GenerationConfig
    text: TextRow


def prepare(pipe: Pipeline, request: ChatRequest, max_len: int, allow_remote_images: bool = False) -> Prepared:
    """Model inputs for ``request``; ``max_len`` is the most slots a request may use (prompt + answer)."""
    images = [_preprocess(pipe, ref, _image_bytes(ref, allow_remote_images)) for ref in request.images]
    pixels = [p for p, _, _ in images]
    try:
        text = pipe.template.format(request.messages)
    except ValueError as err:
        raise invalid("messages", str(err)) from None
    try:
        check_image_count(text.count(IMAGE_MARKER), len(pixels), "the messages: ")
        ids = pipe.processor.encode(text, [count for _, _, count in images])
    except ValueError as err:
        raise invalid("messages", str(err)) from None
    window = min(pipe.context_length, max_len)
    prompt = f"the prompt is {len(ids)} tokens"
    if pixels:
        prompt += f" ({len(pixels)} image(s), {sum(count for _, _, count in images)} image tokens)"
    if len(ids) >= window:
        raise invalid(
            "messages",
            f"{prompt}: the context window of {window} tokens has no room left for an answer",
            "context_length_exceeded",
        )
    max_new = request.max_tokens
    if max_new is None:
        max_new = min(pipe.generation.max_new_tokens, window - len(ids))
    elif len(ids) + max_new > window:
        raise invalid(
            "max_tokens",
            f"{prompt} and max_tokens is {max_new}: {len(ids) + max_new} exceeds the context window of {window} "
            f"tokens; ask for at most {window - len(ids)}",
            "context_length_exceeded",
        )
    try:
        config = pipe.generation.replace(
            max_new_tokens=max_new,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            seed=request.seed,
            stop_strings=request.stop,
        )
    except ValueError as err:
        raise invalid(None, str(err)) from None
    if request.ignore_eos:
        row = TextRow(pipe.processor, config.stop_strings, eos_ids=[])
    else:
        row = pipe.text_rows(1, config)[0]
    if not pixels:
        return Prepared(ids, None, None, config, row)
    if images[0][1] is None:
        return Prepared(ids, torch.stack(pixels), None, config, row)
    return Prepared(ids, pad_tiles(pixels), torch.stack([size for _, size, _ in images]), config, row)


def _preprocess(pipe: Pipeline, ref: ImageRef, data: bytes) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """One image's pixels (``[3, S, S]``, or ``[T, 3, S, S]`` tiles), its (height, width) for LLaVA-1.6 tiling,
    and how many placeholders it takes."""
    try:
        pixels, sizes, counts = pipe.processor.images([data])
    except ImageTooLargeError as err:
        raise invalid(ref.param, f"{ref.param}: {err}", "image_too_large") from None
    except ImageDecodeError as err:
        raise invalid(ref.param, f"{ref.param}: {err}", "invalid_image") from None
    return pixels[0], None if sizes is None else sizes[0], counts[0]


def _image_bytes(ref: ImageRef, allow_remote: bool) -> bytes:
    url = ref.url.strip()
    scheme = urlsplit(url).scheme.lower() if ":" in url else ""
    if scheme == "data":
        header, comma, payload = url.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise invalid(ref.param, f"{ref.param}: a data URL must be data:image/...;base64,<base64 bytes>")
        try:
            return base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError) as err:
            raise invalid(ref.param, f"{ref.param}: the data URL's base64 does not decode ({err})") from None
    if scheme in ("http", "https"):
        if not allow_remote:
            raise invalid(
                ref.param,
                f"{ref.param}: this server does not fetch remote images; send the image inline as a data: URL "
                "(base64), or start the server with --allow-remote-images",
                "remote_image_not_allowed",
            )
        return _fetch(url, ref.param)
    raise invalid(
        ref.param,
        f"{ref.param}: images must be data: URLs (or http(s) URLs with --allow-remote-images); the server never "
        "reads local files",
        "unsupported_image_url",
    )


def _fetch(url: str, param: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:  # noqa: S310 (scheme checked)
            data = response.read(MAX_IMAGE_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise invalid(param, f"{param}: could not fetch {url}: {err}", "image_fetch_failed") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise invalid(param, f"{param}: {url} is over {MAX_IMAGE_BYTES:,} bytes", "image_too_large")
    return data
