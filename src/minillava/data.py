"""LLaVA's training data: a JSON list (or JSONL file) of conversations plus a folder of images.

One sample, as in LLaVA's released data (``llava_v1_5_mix665k.json``, ``blip_laion_cc_sbu_558k.json``)::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

``image`` is optional (text-only samples) and may be a list of paths, one per ``<image>`` marker.
Roles are ``human``/``gpt`` (``user``/``assistant`` and a leading ``system`` are accepted too).

Every record is checked when the dataset is built (structure, alternation, an assistant turn, image
files present), so a bad file stops the run before the first step and names the samples. Images are
decoded and conversations tokenised when a sample is drawn; a failure there names the sample and the
file. With ``skip_bad_samples`` bad samples are dropped and counted instead.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from .image import check_image_count, pad_tiles
from .labels import TokenizationMismatch, supervised_segments, training_example
from .model import IGNORE_INDEX
from .tokenizer import IMAGE_MARKER, pad_batch

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MAX_LISTED = 10  # problems listed in one error message


class DataError(ValueError):
    """The data file, or samples in it, cannot be used."""


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``.json`` file (a list of objects) or a ``.jsonl`` file (one object per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {n}: not valid JSON ({err})") from None
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        hint = " (one object per line? name the file .jsonl)" if text.lstrip().startswith("{") else ""
        raise DataError(f"{path}: not valid JSON ({err}){hint}") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of samples, got {type(records).__name__}")
    return records


def sample_messages(record: Any) -> tuple[list[dict[str, str]], list[str]]:
    """``(messages, image paths)`` of one LLaVA record; ``ValueError`` says what is wrong with it.

    A single-image sample gets original LLaVA's ``preprocess_multimodal``: the marker is moved to the
    front of its turn as ``"<image>\\n" + text``. Several images keep their markers where they are.
    """
    if not isinstance(record, dict):
        raise ValueError(f"a sample must be a JSON object, got {type(record).__name__}")
    convs = record.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise ValueError('no "conversations" list')
    image = record.get("image")
    if image is None:
        images = []
    elif isinstance(image, str):
        images = [image]
    elif isinstance(image, list) and all(isinstance(x, str) for x in image):
        images = list(image)
    else:
        raise ValueError(f'"image" must be a path or a list of paths, got {image!r}')
    messages = []
    for i, turn in enumerate(convs):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
            raise ValueError(f'turn {i} must be {{"from": ..., "value": "..."}}, got {turn!r}')
        role = ROLES.get(turn["from"])
        if role is None:
            raise ValueError(f"turn {i}: unknown speaker {turn['from']!r}; use human/gpt (or user/assistant)")
        messages.append({"role": role, "content": turn["value"]})
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ValueError(
                f"the conversation does not alternate: turn {i + len(messages) - len(turns)} is from "
                f"{m['role']} where {expected} was expected (human first, then gpt, human, ...)"
            )
    if not any(m["role"] == "assistant" for m in turns):
        raise ValueError("the conversation has no assistant (gpt) turn: nothing to learn from it")
    markers = sum(m["content"].count(IMAGE_MARKER) for m in messages)
    if len(images) == 1 and markers == 1:
        for m in messages:
            if IMAGE_MARKER in m["content"]:
                m["content"] = (IMAGE_MARKER + "\n" + m["content"].replace(IMAGE_MARKER, "").strip()).strip()
    check_image_count(markers, len(images), "the conversation: ")
    return messages, images


class LlavaDataset(Dataset):
    """LLaVA JSON/JSONL samples as ``{"id", "input_ids", "labels", "pixel_values"}`` dicts.

    Args:
        data_path: the ``.json`` or ``.jsonl`` file.
        image_folder: where the records' image paths are relative to.
        processor: the checkpoint's :class:`~minillava.processor.Processor`.
        template: chat template name (``plain`` for stage 1, ``vicuna_v1``/``llava_v1`` for stage 2).
        max_length: longer samples are cut (never through an image), or refused with ``refuse_long``.
        skip_bad_samples: drop bad samples (counted) instead of stopping. A tokenisation mismatch always
            stops: it means the template does not fit the tokenizer, not that one sample is bad.
    """

    def __init__(
        self,
        data_path: str | os.PathLike,
        image_folder: str | os.PathLike | None,
        processor,
        template: str | None = None,
        max_length: int | None = None,
        refuse_long: bool = False,
        skip_bad_samples: bool = False,
    ) -> None:
        self.path = Path(data_path)
        self.image_folder = Path(image_folder) if image_folder is not None else self.path.parent
        self.processor = processor
        self.template = template
        self.max_length = max_length
        self.refuse_long = refuse_long
        self.skip_bad_samples = skip_bad_samples
        self.samples: list[tuple[str, list[dict[str, str]], list[Path]]] = []
        problems: list[str] = []
        seen_ids: set[str] = set()
        for index, record in enumerate(read_records(self.path)):
            raw_id = record.get("id") if isinstance(record, dict) else None
            sample_id = str(raw_id) if raw_id is not None else f"#{index}"
            where = f"sample {sample_id!r} (record {index} of {self.path.name})"
            try:
                messages, images = sample_messages(record)
                supervised_segments(messages, template or processor.template)  # roles and turns fit the template
            except ValueError as err:
                problems.append(f"{where}: {err}")
                continue
            paths = [self.image_folder / p for p in images]
            missing = [str(p) for p in paths if not p.is_file()]
            if missing:
                problems.append(f"{where}: image file not found: {', '.join(missing)}")
                continue
            if sample_id in seen_ids:
                sample_id = f"{sample_id}#{index}"
            seen_ids.add(sample_id)
            self.samples.append((sample_id, messages, paths))
        self.skipped_at_start = len(problems)
        if problems and not skip_bad_samples:
            listed = "\n  ".join(problems[:MAX_LISTED])
            more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
            raise DataError(
                f"{self.path}: {len(problems)} bad sample(s):\n  {listed}{more}\n"
                "Fix the data (or the --image-folder), or pass --skip-bad-samples to train without them."
            )
        if problems:
            print(f"{self.path}: skipping {len(problems)} bad sample(s), e.g. {problems[0]}", file=sys.stderr)
        if not self.samples:
            raise DataError(f"{self.path}: no usable samples")

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> list[int]:
        """A cheap length estimate per sample (words of all turns), to group similar lengths into batches. With
        LLaVA-1.6 tiling an image's placeholders vary from about 1,200 to 2,900, so there each image's count is
        added, from its size in the file header (no pixels are decoded)."""
        words = [sum(len(m["content"].split()) for m in messages) for _, messages, _ in self.samples]
        if self.processor.image_config.mode != "anyres":
            return words
        return [n + sum(map(self._image_tokens, paths)) for n, (_, _, paths) in zip(words, self.samples, strict=True)]

    def _image_tokens(self, path: Path) -> int:
        try:
            with Image.open(path) as image:
                return self.processor.image_tokens(image.height, image.width)
        except (OSError, ValueError, SyntaxError):
            return self.processor.num_image_tokens  # a bad file is reported when its sample is read

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        sample_id, messages, paths = self.samples[index]
        try:
            example = training_example(
                self.processor,
                messages,
                paths,
                template=self.template,
                sample_id=sample_id,
                max_length=self.max_length,
                refuse_long=self.refuse_long,
            )
        except TokenizationMismatch:
            raise
        except (ValueError, OSError) as err:
            if not self.skip_bad_samples:
                raise
            print(f"skipping {err}", file=sys.stderr)
            return None
        return {"id": sample_id, **example}


def group_by_length(
    indices: Sequence[int], lengths: Sequence[int], batch_size: int, seed: int, megabatch: int = 32
) -> list[int]:
    """``indices`` reordered so that each run of ``batch_size`` holds samples of similar length: less padding.

    The indices are cut, in their (already shuffled) order, into megabatches of ``megabatch`` batches; each is
    sorted by length and split into batches, and the full batches of a megabatch are shuffled (seeded) so that
    steps do not go from long to short. A short batch can only be the very last one. Like transformers'
    ``group_by_length`` and LLaVA's modality-length grouping, without the distributed split.
    """
    generator = torch.Generator().manual_seed(seed)
    out: list[int] = []
    chunk = batch_size * megabatch
    for start in range(0, len(indices), chunk):
        ordered = sorted(indices[start : start + chunk], key=lambda i: lengths[i], reverse=True)
        batches = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
        full = len(ordered) // batch_size
        for b in torch.randperm(full, generator=generator).tolist():
            out += batches[b]
        out += [i for batch in batches[full:] for i in batch]
    return out


class Collator:
    """Right-pads a list of samples into a batch; images stay in sample order.

    Returns ``input_ids``/``labels``/``attention_mask`` ``[B, L]`` (padding: ``pad_token_id``, ``-100``, 0),
    ``pixel_values`` ``[N, 3, S, S]`` (or ``None``), the sample ``ids`` and ``skipped`` (samples that
    came back as ``None`` because they were bad). A batch whose samples were all skipped has ``B = 0``.
    LLaVA-1.6 samples give ``pixel_values`` ``[N, max_tiles, 3, S, S]`` and ``image_sizes`` ``[N, 2]``.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = int(pad_token_id)

    def __call__(self, items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
        good = [item for item in items if item is not None]
        if good:
            input_ids, mask = pad_batch([item["input_ids"] for item in good], self.pad_token_id, "right")
            labels, _ = pad_batch([item["labels"] for item in good], IGNORE_INDEX, "right")
        else:  # every sample of the batch was skipped
            input_ids = labels = mask = torch.zeros((0, 0), dtype=torch.long)
        pixels = [item["pixel_values"] for item in good if item["pixel_values"] is not None]
        sizes = [item["image_sizes"] for item in good if item.get("image_sizes") is not None]
        batch = {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": mask,
            "pixel_values": torch.cat(pixels) if pixels and not sizes else None,
            "ids": [item["id"] for item in good],
            "skipped": len(items) - len(good),
        }
        if sizes:  # LLaVA-1.6 tiles: pad every image to the batch's most tiles
            batch["pixel_values"] = pad_tiles([tiles for stack in pixels for tiles in stack])
            batch["image_sizes"] = torch.cat(sizes)
        return batch
