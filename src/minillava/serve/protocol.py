"""OpenAI's Chat Completions schema: the request checked field by field, the response and chunk bodies, and the
error body (``{"error": {"message", "type", "param", "code"}}``).

Parsing is pure (no model, no I/O): it gives a :class:`ChatRequest` whose messages are the text the chat template
renders, with an ``<image>`` marker per image part (images first in their message unless the text places markers
itself, as :meth:`Pipeline.chat <minillava.pipeline.Pipeline.chat>` does), and the image URLs in marker order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

from ..pipeline import with_image_markers

MAX_STOP_STRINGS = 4  # OpenAI's limit

# Fields this server does not implement, with the values that mean "off" (accepted; anything else is an error).
UNSUPPORTED = {
    "n": (1,),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "logit_bias": ({},),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "response_format": ({"type": "text"},),
}

_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error"}


class APIError(Exception):
    """An error the client gets as HTTP ``status`` with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        kind = _ERROR_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def invalid(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


@dataclass(frozen=True)
class ImageRef:
    """An image part: its URL and where it was in the request (for error messages)."""

    url: str
    param: str


@dataclass(frozen=True)
class ChatRequest:
    """A checked ``/v1/chat/completions`` request. ``None`` settings take the checkpoint's defaults."""

    messages: list[dict[str, str]]
    images: list[ImageRef]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False


def parse_chat_request(body: bytes) -> ChatRequest:
    """Check a request body; raise :class:`APIError` (400) naming the offending field."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise invalid(None, f"the request body is not valid JSON: {err}", "invalid_json") from None
    if not isinstance(data, dict):
        raise invalid(None, f"the request body must be a JSON object, got {type(data).__name__}")
    for name, off in UNSUPPORTED.items():
        if data.get(name) is not None and data[name] not in off:
            raise invalid(name, f"{name}={data[name]!r} is not supported by this server; leave it out")
    if "model" in data and not isinstance(data["model"], str):
        raise invalid("model", "model must be a string")
    messages, images = _messages(data.get("messages"))
    max_tokens = _optional(data, "max_completion_tokens", int, lo=1)
    if max_tokens is None:
        max_tokens = _optional(data, "max_tokens", int, lo=1)
    top_k = _optional(data, "top_k", int, lo=-1)
    if top_k == 0:
        raise invalid("top_k", "top_k must be >= 1 (or -1 or null to disable)")
    stream_options = data.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise invalid("stream_options", 'stream_options must be an object like {"include_usage": true}')
    return ChatRequest(
        messages=messages,
        images=images,
        max_tokens=max_tokens,
        temperature=_optional(data, "temperature", float, lo=0, hi=2),
        top_p=_optional(data, "top_p", float, lo=0, hi=1, open_lo=True),
        top_k=None if top_k == -1 else top_k,
        seed=_optional(data, "seed", int, lo=0, hi=2**64 - 1),
        stop=_stop(data.get("stop")),
        stream=_flag(data, "stream"),
        include_usage=_flag(stream_options or {}, "include_usage", "stream_options.include_usage"),
        ignore_eos=_flag(data, "ignore_eos"),
    )


def _optional(data: Mapping, name: str, kind: type, lo=None, hi=None, open_lo: bool = False):
    value = data.get(name)
    if value is None:
        return None
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind is int and not is_int:
        raise invalid(name, f"{name} must be an integer, got {json.dumps(value)}")
    if kind is float and not (is_int or isinstance(value, float)) or (isinstance(value, float) and math.isnan(value)):
        raise invalid(name, f"{name} must be a number, got {json.dumps(value)}")
    below = lo is not None and (value <= lo if open_lo else value < lo)
    if below or (hi is not None and value > hi):
        lower = f"> {lo}" if open_lo else f">= {lo}"
        bounds = lower if hi is None else f"{lower} and <= {hi}"
        raise invalid(name, f"{name} must be {bounds}, got {value}")
    return value if kind is int else float(value)


def _flag(data: Mapping, name: str, param: str | None = None) -> bool:
    value = data.get(name)
    if value is not None and not isinstance(value, bool):
        raise invalid(param or name, f"{param or name} must be true or false, got {json.dumps(value)}")
    return bool(value)


def _stop(value) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("stop", "stop must be a string or a list of strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid("stop", f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
    return tuple(s for s in stops if s)


def _messages(value) -> tuple[list[dict[str, str]], list[ImageRef]]:
    if not isinstance(value, list) or not value:
        raise invalid("messages", 'messages must be a non-empty list of {"role": ..., "content": ...} objects')
    messages, images = [], []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(where, f"{where} must be an object with role and content")
        role = message.get("role")
        if role == "developer":  # OpenAI's newer name for the system message
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise invalid(f"{where}.role", f"{where}.role must be system, user or assistant, got {json.dumps(role)}")
        text, refs = _content(message.get("content"), f"{where}.content", allow_images=role == "user")
        messages.append({"role": role, "content": with_image_markers(text, len(refs))})
        images += refs
    return messages, images


def _content(value, where: str, allow_images: bool) -> tuple[str, list[ImageRef]]:
    """A message's text (text parts joined by newlines) and its image parts."""
    if isinstance(value, str):
        return value, []
    if not isinstance(value, list):
        raise invalid(where, f"{where} must be a string or a list of content parts")
    texts, refs = [], []
    for j, part in enumerate(value):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and allow_images:
            image = part.get("image_url")
            if not isinstance(image, dict) or not isinstance(image.get("url"), str):
                raise invalid(f"{at}.image_url", f'{at}.image_url must be an object like {{"url": "data:..."}}')
            refs.append(ImageRef(image["url"], f"{at}.image_url.url"))
        elif kind == "image_url":
            raise invalid(at, f"{at}: only user messages may hold images")
        else:
            raise invalid(
                at, f'{at} must be {{"type": "text", "text": ...}} or {{"type": "image_url", "image_url": {{...}}}}'
            )
    return "\n".join(texts), refs


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(ident: str, created: int, model: str, text: str, finish_reason: str, counts: dict) -> dict:
    """A whole ``chat.completion`` body."""
    message = {"role": "assistant", "content": text}
    return {
        "id": ident,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
        "usage": counts,
    }


def chunk(ident: str, created: int, model: str, delta: dict, finish_reason: str | None = None) -> dict:
    """One ``chat.completion.chunk`` of a stream."""
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
