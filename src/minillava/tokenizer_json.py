"""LLaMA and Mistral tokenizers saved as ``tokenizer.json`` alone (transformers 5 writes no ``tokenizer.model``).

The file is run by the ``tokenizers`` package (an optional extra: ``pip install 'minillava[tokenizers]'``), set up
the way transformers 5 sets it up, so the ids are transformers' for the same folder. transformers 5 does not run a
LLaMA ``tokenizer.json`` as written: its ``LlamaTokenizer`` keeps the file's vocabulary, merges, added tokens and
post-processor, and rebuilds the rest: no normalizer; byte fallback; a ``Metaspace`` pre-tokenizer that puts the
dummy-prefix ``▁`` on the first piece of text when ``legacy`` is false (its default, unlike the sentencepiece
tokenizer's) and on every piece between special tokens when it is true, or nowhere when ``add_prefix_space`` is
false. Files of the generic class (``PreTrainedTokenizerFast``, ``TokenizersBackend``) run as they are. Other
tokenizer classes, and models other than a BPE with byte fallback, are refused with the fix named.

LLaVA's image rule (:meth:`~minillava.tokenizer.Tokenizer.encode`) and the decoding tables are shared with the
sentencepiece tokenizer; decoding follows transformers' fast decoder (the dummy-prefix space is dropped at the
start of the text only).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .extras import import_optional
from .tokenizer import Tokenizer
from .tokenizer_files import AddedToken

LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast", None)
"""``tokenizer_class`` values transformers builds its LLaMA tokenizer for (a missing one: LLaVA's tokenizers are
LLaMA's)."""
GENERIC_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def llama_pipeline(data: dict[str, Any], legacy: bool, add_prefix_space: bool) -> dict[str, Any]:
    """``tokenizer.json`` contents as transformers 5's ``LlamaTokenizer`` rebuilds them."""
    model = data["model"]
    prepend = ("always" if legacy else "first") if add_prefix_space else "never"
    decoders = [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if add_prefix_space:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        **data,
        "normalizer": None,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": prepend, "split": False},
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": model["vocab"],
            "merges": model.get("merges", []),
        },
    }


def _strips_leading_space(decoder: dict[str, Any] | None) -> bool:
    if not decoder:
        return False
    parts = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    return any(p.get("type") == "Strip" and p.get("start", 0) >= 1 for p in parts)


class JsonTokenizer(Tokenizer):
    """A :class:`~minillava.tokenizer.Tokenizer` whose text pieces are encoded by a ``tokenizers`` BPE model read
    from ``tokenizer.json``. Build it with :meth:`Tokenizer.from_dir <minillava.tokenizer.Tokenizer.from_dir>`."""

    def __init__(
        self,
        tokenizer_json: str | Path,
        *,
        tokenizer_class: str | None = None,
        legacy: bool = False,
        add_prefix_space: bool | None = None,
        added_tokens: Sequence[AddedToken] = (),
        bos_token: str | None = "<s>",
        eos_token: str | None = "</s>",
        unk_token: str | None = "<unk>",
        pad_token: str | None = None,
        additional_special_tokens: Sequence[str] = (),
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        source: str = "<in memory>",
    ) -> None:
        tokenizers = import_optional("tokenizers", "tokenizers", f"{source}: reading tokenizer.json")
        path = Path(tokenizer_json)
        self.source = source
        self.legacy = bool(legacy)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            model = data["model"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a tokenizers file ({err})") from None
        kind = f"a {model.get('type')} model" + (" with byte fallback" if model.get("byte_fallback") else "")
        if tokenizer_class in LLAMA_CLASSES:
            if model.get("type") != "BPE":
                raise ValueError(f"{path}: {kind}; a LLaMA tokenizer.json holds a BPE model")
            add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
            data = llama_pipeline(data, self.legacy, add_prefix_space)
            self._dummy_prefix = add_prefix_space
        elif tokenizer_class in GENERIC_CLASSES and model.get("type") == "BPE" and model.get("byte_fallback"):
            self._dummy_prefix = _strips_leading_space(data.get("decoder"))
        else:
            raise ValueError(
                f"{path}: tokenizer_class {tokenizer_class!r} with {kind}: minillava reads LLaMA and Mistral "
                "tokenizers (a BPE with byte fallback); copy tokenizer.model from the original checkpoint into "
                f"{path.parent} to use sentencepiece instead"
            )
        try:
            self._tk = tokenizers.Tokenizer.from_str(json.dumps(data))
        except Exception as err:  # the Rust side raises its own exception type
            raise ValueError(f"{path}: the tokenizers package cannot read it ({err})") from None
        # transformers' fast decoder drops the dummy-prefix space at the start of the text only.
        self._prefix_after_special = False
        vocab: dict[str, int] = model["vocab"]
        pieces = [""] * (max(vocab.values(), default=-1) + 1)
        for piece, i in vocab.items():
            pieces[i] = piece
        in_file = {t["content"]: t for t in data.get("added_tokens") or []}
        tokens = {
            t["content"]: AddedToken(
                t["content"], int(t["id"]), bool(t.get("special")), bool(t.get("lstrip")), bool(t.get("rstrip"))
            )
            for t in in_file.values()
        }
        for tok in added_tokens:  # tokenizer_config.json's entries name the same tokens; the file's ids win
            tokens.setdefault(tok.content, tok)
        self._init_vocabulary(
            pieces=pieces,
            byte_ids={i for i, piece in enumerate(pieces) if _BYTE_PIECE.fullmatch(piece)},
            control_ids=set(),
            added_tokens=list(tokens.values()),
            names={"bos": bos_token, "eos": eos_token, "unk": unk_token, "pad": pad_token},
            additional_special_tokens=additional_special_tokens,
        )
        # Without the flags in tokenizer_config.json, transformers keeps the file's post-processor: ask it.
        with_specials = self._tk.encode("a", add_special_tokens=True).ids
        plain = self._tk.encode("a", add_special_tokens=False).ids
        if add_bos_token is None:
            add_bos_token = len(with_specials) > len(plain) and with_specials[0] == self.bos_token_id
        if add_eos_token is None:
            add_eos_token = len(with_specials) > len(plain) and with_specials[-1] == self.eos_token_id
        self.add_bos_token = bool(add_bos_token)
        self.add_eos_token = bool(add_eos_token)
        self._ids_cache: dict[str, tuple[int, ...]] = {}

    def tokenize(self, text: str) -> list[str]:
        """The token strings of ``text`` without BOS/EOS."""
        return self._tk.encode(text, add_special_tokens=False).tokens

    def _encode(self, text: str) -> tuple[int, ...]:
        return tuple(self._tk.encode(text, add_special_tokens=False).ids)
