"""Conversations to training ``input_ids`` and ``labels``: only the assistant's answers are supervised.

Original LLaVA (``preprocess_v1``) tokenises the whole prompt, then recounts each round's tokens on its own
to find where the answers are, and when the counts disagree with the whole it masks the entire sample
with a "tokenization mismatch" warning: the silent "loss 0.0" trap. Here the prompt is cut into pieces
that alternate between prompt text and answers (each answer with the separator that ends its turn:
``</s>`` for vicuna/llava_v1, ``\\n`` after a ``plain`` caption). The whole prompt is tokenised once
with LLaVA's chunk-wise ``<image>`` rule, and so is every prefix that ends at a piece boundary; the
answer tokens are those between the boundaries. If a prefix's ids are not a prefix of the whole ids,
the pieces do not tokenise on their own and :class:`TokenizationMismatch` names the sample: nothing is
masked silently.

A space at a boundary goes to the piece after it, because sentencepiece glues a space to the word that
follows (``"ASSISTANT: Yes"`` is ``... ":" "▁Yes"``). That is also what the original's ``- 2`` in
``instruction_len`` accounts for, so the supervised tokens are the same.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch

from .chat import ChatTemplate, get_template
from .image import ImageInput, anyres_pixel_values, check_image_count, image_list, load_image, pad_tiles, pixel_values
from .model import IGNORE_INDEX
from .tokenizer import IMAGE_MARKER


class TokenizationMismatch(ValueError):
    """The conversation's pieces do not tokenise to the same ids as the whole prompt."""


class SampleTooLong(ValueError):
    """A sample is longer than the allowed length and was refused (or nothing supervised survives the cut)."""


def _name(sample_id: object) -> str:
    return "sample" if sample_id is None else f"sample {sample_id!r}"


def supervised_segments(
    messages: Sequence[Mapping[str, str]], template: str | ChatTemplate | None
) -> list[tuple[str, bool]]:
    """The rendered conversation as alternating ``(text, is_answer)`` pieces.

    ``plain`` (stage 1) follows original LLaVA's ``preprocess_plain``: the user turn is replaced by its
    image markers alone and the caption is supervised with the ``\\n`` after it. Every other template
    renders finished turns with its separators; each answer piece carries its end-of-turn separator.
    """
    tpl = get_template(template)
    if tpl.layout == "plain":
        turns = [m for m in messages if m.get("role") != "system"]
        if len(turns) != 2 or turns[0].get("role") != "user" or turns[1].get("role") != "assistant":
            raise ValueError(
                "the plain template (stage-1 captioning) needs exactly one user turn with the image and one "
                f"assistant turn with the caption; got roles {[m.get('role') for m in messages]}"
            )
        markers = str(turns[0].get("content", "")).count(IMAGE_MARKER)
        if markers == 0:
            raise ValueError(f"the plain template needs an {IMAGE_MARKER} marker in the user turn")
        caption = turns[1].get("content")
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError("the plain template needs a non-empty caption in the assistant turn")
        pieces = [(IMAGE_MARKER * markers, False), (caption + (tpl.sep2 or ""), True)]
    else:
        pieces = tpl.segments(messages, add_generation_prompt=False)
    if not any(is_answer for _, is_answer in pieces):
        raise ValueError("the conversation has no assistant turn: nothing would be supervised")
    # Merge neighbours of the same kind, so that pieces alternate prompt / answer.
    merged: list[list] = []
    for text, is_answer in pieces:
        if merged and merged[-1][1] == is_answer:
            merged[-1][0] += text
        else:
            merged.append([text, is_answer])
    # Spaces at a boundary belong to the next piece (sentencepiece attaches a space to the following word).
    for i in range(len(merged) - 1):
        text = merged[i][0]
        stripped = text.rstrip(" ")
        if stripped != text and stripped:
            merged[i][0] = stripped
            merged[i + 1][0] = text[len(stripped) :] + merged[i + 1][0]
    return [(text, is_answer) for text, is_answer in merged]


def encode_supervised(
    processor, segments: Sequence[tuple[str, bool]], sample_id: object = None, image_tokens: Sequence[int] | None = None
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of alternating pieces; raises :class:`TokenizationMismatch` naming the sample.

    ``image_tokens``: each image's placeholder count, in order (default: ``num_image_tokens`` each).
    """
    tok = processor.tokenizer
    image_id = processor.image_token_id
    text = "".join(t for t, _ in segments)
    counts = list(image_tokens) if image_tokens is not None else [processor.num_image_tokens] * text.count(IMAGE_MARKER)
    ids = tok.encode(text, counts, image_id)
    labels = [IGNORE_INDEX] * len(ids)
    prefix = ""
    start = 0
    for i, (piece, is_answer) in enumerate(segments):
        prefix += piece
        end = len(ids)
        if i < len(segments) - 1:
            prefix_ids = tok.encode(prefix, counts[: prefix.count(IMAGE_MARKER)], image_id)
            end = len(prefix_ids)
            if prefix_ids != ids[:end]:
                pairs = enumerate(zip(prefix_ids, ids, strict=False))
                at = next((j for j, (a, b) in pairs if a != b), min(end, len(ids)))
                raise TokenizationMismatch(
                    f"{_name(sample_id)}: tokenization mismatch after piece {i} ({piece[-40:]!r}): the ids of the "
                    f"text up to there differ from the whole prompt's ids from position {at} on "
                    f"(prefix ...{prefix_ids[max(0, at - 2) : at + 3]}, whole ...{ids[max(0, at - 2) : at + 3]}). "
                    "The turns do not tokenise on their own with this tokenizer and template; check that the "
                    "template matches the tokenizer (and its legacy flag). The sample was not used."
                )
        if is_answer:
            labels[start:end] = ids[start:end]
        start = end
    # Image placeholders are never predicted, even if an answer contained a marker.
    labels = [IGNORE_INDEX if t == image_id else lab for t, lab in zip(ids, labels, strict=True)]
    return ids, labels


def truncate(
    input_ids: list[int],
    labels: list[int],
    max_length: int,
    image_token_id: int,
    num_image_tokens: int | Sequence[int],
) -> tuple[list[int], list[int], int]:
    """Cut to ``max_length`` tokens without cutting through an image's placeholders.

    ``num_image_tokens`` is K, or each image's placeholder count in order (LLaVA-1.6 images differ). Returns
    ``(input_ids, labels, images_kept)``: an image whose placeholders would be cut is dropped whole, and so is
    every image after it.
    """
    places = [i for i, t in enumerate(input_ids) if t == image_token_id]
    if isinstance(num_image_tokens, int):
        num_image_tokens = [num_image_tokens] * (len(places) // num_image_tokens)
    spans, first = [], 0
    for n in num_image_tokens:  # image i takes the next n placeholders, one run
        spans.append((places[first], places[first + n - 1] + 1))
        first += n
    if len(input_ids) <= max_length:
        return input_ids, labels, len(spans)
    cut = next((start for start, end in spans if start < max_length < end), max_length)
    return input_ids[:cut], labels[:cut], sum(end <= cut for _, end in spans)


def training_example(
    processor,
    messages: Sequence[Mapping[str, str]],
    images: Sequence[ImageInput] | None = None,
    template: str | ChatTemplate | None = None,
    sample_id: object = None,
    *,
    max_length: int | None = None,
    refuse_long: bool = False,
) -> dict[str, torch.Tensor | None]:
    """One training sample: ``input_ids``, ``labels`` (int64 ``[L]``) and ``pixel_values`` (``[N, 3, S, S]`` or None;
    for LLaVA-1.6 anyres images ``[N, tiles, 3, S, S]`` with ``image_sizes`` ``[N, 2]``).

    Only the assistant turns, each with its end-of-turn separator, are supervised; prompts and image
    placeholders are ``-100``. Each ``<image>`` marker becomes its image's placeholder ids (``K``, or an anyres
    image's count), in image order.

    Args:
        processor: a :class:`~minillava.processor.Processor` (tokenizer, placeholder id and ``K``, image settings).
        messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``, user first, alternating.
        images: one image (path, bytes or PIL image) per ``<image>`` marker, in order.
        template: chat template name or object (default: the processor's).
        sample_id: how errors name the sample.
        max_length: cut longer samples to this many tokens (never through an image's placeholders).
        refuse_long: raise :class:`SampleTooLong` instead of cutting.

    Raises:
        ValueError: bad roles/alternation, no assistant turn, marker/image count mismatch,
            :class:`TokenizationMismatch`, :class:`SampleTooLong`. OSError: an image cannot be read.
        Every message names the sample.
    """
    name = _name(sample_id)
    tpl = get_template(template or processor.template)
    images = image_list(images)
    markers = sum(str(m.get("content", "")).count(IMAGE_MARKER) for m in messages if isinstance(m, Mapping))
    if tpl.layout != "plain":
        check_image_count(markers, len(images), f"{name}: ")
    try:
        segments = supervised_segments(messages, tpl)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    if tpl.layout == "plain":
        check_image_count(segments[0][0].count(IMAGE_MARKER), len(images), f"{name}: ")
    loaded = []
    for i, image in enumerate(images):
        where = f"{name}, image {i} ({image if isinstance(image, (str, os.PathLike)) else type(image).__name__})"
        # load_image raises FileNotFoundError / ImageDecodeError (OSError) naming the sample and the file.
        loaded.append((load_image(image, processor.max_pixels, name=where), where))
    counts = [processor.image_tokens(rgb.height, rgb.width) for rgb, _ in loaded]
    ids, labels = encode_supervised(processor, segments, sample_id, counts)
    n_images = len(images)
    if max_length is not None and len(ids) > max_length:
        if refuse_long:
            raise SampleTooLong(
                f"{name}: {len(ids)} tokens (images included) is longer than max_length {max_length}; "
                "raise --max-length, drop the sample, or allow truncation"
            )
        ids, labels, n_images = truncate(ids, labels, max_length, processor.image_token_id, counts)
    if all(lab == IGNORE_INDEX for lab in labels[1:]):
        raise SampleTooLong(
            f"{name}: nothing supervised is left after cutting to max_length {max_length} "
            f"({len(ids)} tokens kept); raise --max-length"
        )
    sample = {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "pixel_values": None,
    }
    config, limit = processor.image_config, processor.max_pixels
    if config.mode == "anyres":
        pinpoints = processor.anyres.grid_pinpoints
        stacks = [anyres_pixel_values(rgb, config, pinpoints, limit, name=w) for rgb, w in loaded[:n_images]]
        sample["pixel_values"] = pad_tiles(stacks) if stacks else None
        sizes = [(rgb.height, rgb.width) for rgb, _ in loaded[:n_images]]
        sample["image_sizes"] = torch.tensor(sizes, dtype=torch.long) if sizes else None
    elif n_images:
        sample["pixel_values"] = torch.stack([pixel_values(rgb, config, limit, name=w) for rgb, w in loaded[:n_images]])
    return sample
