"""Reading a LLaMA tokenizer directory: ``tokenizer.model`` (or, without it, ``tokenizer.json``: see
:mod:`minillava.tokenizer_json`) and the transformers JSON files beside it.

The JSON files are read the way transformers does: ``tokenizer_config.json`` (``legacy``, ``add_bos_token``,
``add_eos_token``, special tokens, ``added_tokens_decoder``) and, for older checkpoints without
``added_tokens_decoder``, ``special_tokens_map.json`` and ``added_tokens.json``. A few lines of protobuf wire
format read (and patch) the sentencepiece model's normaliser settings without the protobuf package.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import read_json


@dataclass(frozen=True)
class AddedToken:
    """A token matched in raw text before sentencepiece runs (``added_tokens_decoder`` entries)."""

    content: str
    id: int
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(buf: bytes) -> Iterable[tuple[int, int, object]]:
    """Yield ``(field number, wire type, value)``; length-delimited values are bytes, others ints."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def add_dummy_prefix(model_proto: bytes) -> bool:
    """``ModelProto.normalizer_spec.add_dummy_prefix`` (field 3 of field 3; proto default True, last one wins)."""
    result = True
    for number, wire, value in _fields(model_proto):
        if number == 3 and wire == 2:
            for inner, inner_wire, inner_value in _fields(value):
                if inner == 3 and inner_wire == 0:
                    result = bool(inner_value)
    return result


# Appending a second ``normalizer_spec`` holding only ``add_dummy_prefix: false`` merges into the first one
# (protobuf merges repeated message fields, last scalar wins): the same edit transformers makes with
# ``normalizer_spec.MergeFrom`` for non-legacy tokenizers.
NO_DUMMY_PREFIX = bytes([3 << 3 | 2, 2, 3 << 3 | 0, 0])


def token_content(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"cannot read a token from {value!r}")


def read_tokenizer_dir(directory: str | os.PathLike) -> dict[str, Any]:
    """The :class:`~minillava.tokenizer.Tokenizer` arguments a tokenizer directory holds (with ``tokenizer_json``
    instead of ``model_proto`` when there is no sentencepiece model: the arguments of
    :class:`~minillava.tokenizer_json.JsonTokenizer`)."""
    path = Path(directory)
    model = path / "tokenizer.model"
    if not model.is_file() and not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{path}: no tokenizer (neither tokenizer.model nor tokenizer.json); copy the tokenizer files of the "
            f"original checkpoint into {path}"
        )
    config = read_json(path / "tokenizer_config.json", missing_ok=True)
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    defaults = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None}
    special = {name: token_content(config[name]) for name in names if name in config}
    additional = [token_content(t) for t in config.get("additional_special_tokens") or []]
    special_map = read_json(path / "special_tokens_map.json", missing_ok=True)
    added: list[AddedToken] = []
    if "added_tokens_decoder" in config:
        for idx, entry in config["added_tokens_decoder"].items():
            added.append(
                AddedToken(
                    content=entry["content"],
                    id=int(idx),
                    special=bool(entry.get("special", False)),
                    lstrip=bool(entry.get("lstrip", False)),
                    rstrip=bool(entry.get("rstrip", False)),
                    single_word=bool(entry.get("single_word", False)),
                )
            )
    else:
        # Older checkpoints: special_tokens_map.json overrides the config (vicuna's pad_token null -> "<unk>").
        for name in names:
            if name in special_map:
                special[name] = token_content(special_map[name])
        if "additional_special_tokens" in special_map:
            additional = [token_content(t) for t in special_map["additional_special_tokens"] or []]
        marked = {t for t in (*special.values(), *additional) if t is not None}
        for content, idx in read_json(path / "added_tokens.json", missing_ok=True).items():
            added.append(AddedToken(content=content, id=int(idx), special=content in marked))
    for name, value in defaults.items():
        if name not in special:  # a name in neither file: special_tokens_map.json, else the LLaMA default
            special[name] = token_content(special_map.get(name, value))
    common = dict(
        added_tokens=added,
        bos_token=special["bos_token"],
        eos_token=special["eos_token"],
        unk_token=special["unk_token"],
        pad_token=special["pad_token"],
        additional_special_tokens=additional,
        source=str(path),
    )
    if not model.is_file():
        # transformers 5's reading (minillava.tokenizer_json): legacy only when set; BOS/EOS per the file unless set.
        return dict(
            tokenizer_json=path / "tokenizer.json",
            tokenizer_class=config.get("tokenizer_class"),
            legacy=config.get("legacy") is True,
            add_prefix_space=config.get("add_prefix_space"),
            add_bos_token=config.get("add_bos_token"),
            add_eos_token=config.get("add_eos_token"),
            **common,
        )
    return dict(
        model_proto=model.read_bytes(),
        legacy=config.get("legacy", True) is not False,  # transformers 4.37: a missing value means legacy
        add_bos_token=config.get("add_bos_token", True),
        add_eos_token=config.get("add_eos_token", False),
        **common,
    )
