"""A LLaMA-style sentencepiece tokenizer built in-process, for tests that need real token ids.

No download: the model is trained once per test process from a generated corpus (well under a second) with
LLaMA's trainer options: BPE, byte fallback, split digits, a dummy prefix, identity normalisation, whitespace kept
as is, ``<unk>``=0, ``<s>``=1, ``</s>``=2. The vocabulary is small (:data:`VOCAB_SIZE`), so most non-ASCII text
falls back to byte pieces, which is what the decoding tests want.

Reuse from any test module::

    from tests.sp_fixtures import write_tokenizer_dir

    def test_something(tmp_path):
        tok_dir = write_tokenizer_dir(tmp_path)  # llava-hf style: <image>=VOCAB_SIZE, <pad>=VOCAB_SIZE+1
        ...

:func:`write_tokenizer_dir` writes the files a converted checkpoint carries next to ``config.json``:
``tokenizer.model``, ``tokenizer_config.json`` and ``special_tokens_map.json``. :class:`SlowLlamaReference` gives
the ids transformers 4.37's slow ``LlamaTokenizer`` (original LLaVA's) produces for such a directory, rebuilt from
what transformers 5.x still ships; it needs ``transformers`` and ``protobuf``::

    ref = SlowLlamaReference(tok_dir)
    ref("USER: hi")                       # tokenizer(text).input_ids
    ref.image_prompt(prompt, K, image_id)  # LLaVA's tokenizer_image_token, K placeholders per <image>
"""

from __future__ import annotations

import functools
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

from minillava.shapes.tokenizer import train_sentencepiece

VOCAB_SIZE = 800
"""Pieces in the sentencepiece model; added tokens get ids from here on (like llava-hf's 32000, 32001)."""

SYSTEM_PROMPTS = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language.",
    "Answer the questions.",
)
_WORDS = (
    "the a an is are was of in on at to and or with what where which who how many describe image picture photo "
    "cat dog man woman car tree sky red blue green small large left right top bottom there this that these "
    "color number people sitting standing holding looking table street building water food answer question "
    "please briefly detail short word phrase using single yes no USER ASSISTANT SYSTEM INST SYS"
).split()
_MARKUP = ("USER:", "ASSISTANT:", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<|im_start|>user", "<|im_end|>")
_EXTRA = ("café", "naïve", "über", "日本", "猫", "²", "—", "“quoted”")


def _corpus(lines: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = list(SYSTEM_PROMPTS)
    for _ in range(lines):
        n = rng.randint(3, 14)
        words = [rng.choice(_WORDS) for _ in range(n)]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words) + 1), rng.choice(_MARKUP))
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words) + 1), str(rng.randint(0, 10 ** rng.randint(1, 6))))
        if rng.random() < 0.05:
            words.insert(rng.randrange(len(words) + 1), rng.choice(_EXTRA))
        sep = "  " if rng.random() < 0.05 else " "  # some double spaces: whitespace-only pieces as LLaMA has
        line = sep.join(words)
        out.append(line[0].upper() + line[1:] + rng.choice((".", "?", "!", ":", "")))
    return out


@functools.lru_cache(maxsize=2)
def sp_model_bytes(remove_extra_whitespaces: bool = False) -> bytes:
    """The serialized sentencepiece model (trained on first use, then cached for the process).

    ``remove_extra_whitespaces=True`` gives a non-LLaMA variant that squeezes spaces, where the slow tokenizer's
    non-legacy ``<unk>`` trick matters.
    """
    return train_sentencepiece(_corpus(), VOCAB_SIZE, remove_extra_whitespaces=remove_extra_whitespaces)


def _added(content: str) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def write_tokenizer_dir(
    dst: str | os.PathLike,
    *,
    added_tokens: Sequence[str] = ("<image>", "<pad>"),
    legacy: bool | None = False,
    pad_token: str | None = "<pad>",
    add_bos_token: bool = True,
    added_tokens_json: bool = False,
    remove_extra_whitespaces: bool = False,
) -> Path:
    """Write a LLaMA tokenizer directory to ``dst`` (created if missing) and return its path.

    Args:
        dst: target directory; existing tokenizer files there are overwritten.
        added_tokens: tokens appended after the sentencepiece vocabulary with ids ``VOCAB_SIZE, VOCAB_SIZE+1, ...``,
            all special, as llava-hf adds ``<image>`` (32000) and ``<pad>`` (32001). Pass ``()`` for the original
            LLaVA layout (vocabulary = the sentencepiece model).
        legacy: the ``legacy`` field of ``tokenizer_config.json``; ``None`` leaves it out (readers then use True).
        pad_token: the pad token written to the config (``None``: no pad token, as original LLaVA ships).
        add_bos_token: the ``add_bos_token`` field.
        added_tokens_json: also write the older ``added_tokens.json`` ({content: id}) next to the config.
        remove_extra_whitespaces: use the whitespace-squeezing model variant (not LLaMA's).
    """
    path = Path(dst)
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(sp_model_bytes(remove_extra_whitespaces))
    decoder = {"0": _added("<unk>"), "1": _added("<s>"), "2": _added("</s>")}
    decoder.update({str(VOCAB_SIZE + i): _added(tok) for i, tok in enumerate(added_tokens)})
    if pad_token is not None and pad_token not in {d["content"] for d in decoder.values()}:
        raise ValueError(f"pad_token {pad_token!r} is neither a base special token nor in added_tokens")
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": add_bos_token,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": pad_token,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "sp_model_kwargs": {},
        "added_tokens_decoder": decoder,
    }
    if legacy is not None:
        config["legacy"] = legacy
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if pad_token is not None:
        special["pad_token"] = pad_token
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    if added_tokens_json:
        mapping = {tok: VOCAB_SIZE + i for i, tok in enumerate(added_tokens)}
        (path / "added_tokens.json").write_text(json.dumps(mapping, indent=2) + "\n")
    return path


class SlowLlamaReference:
    """transformers 4.37's slow ``LlamaTokenizer`` (what original LLaVA loads), rebuilt on transformers 5.x.

    transformers 5.x dropped the slow ``LlamaTokenizer``; its ``AutoTokenizer`` gives a ``tokenizers``-backed
    one that differs from sentencepiece on text starting with a space (it writes ``"▁ASSISTANT"`` where
    sentencepiece writes ``"▁", "▁ASSISTANT"``). The old machinery survives as ``SentencePieceBackend``: the
    added-token trie, ``sp_model.encode`` per text piece, and for ``legacy=False`` the model without dummy
    prefix plus the ``<unk>`` trick. Only ``LlamaTokenizer.tokenize``'s non-legacy rule is missing; it is
    restated here: prepend ``"▁"`` to the whole text, then drop it again when a special token follows.

    ``reference(text)`` is ``tokenizer(text).input_ids``; :meth:`image_prompt` is LLaVA's
    ``tokenizer_image_token`` with ``K`` placeholders per ``<image>``.
    """

    def __init__(self, tokenizer_dir: str | os.PathLike) -> None:
        from transformers.tokenization_utils_base import AddedToken
        from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

        path = Path(tokenizer_dir)
        config = json.loads((path / "tokenizer_config.json").read_text())
        legacy = config.get("legacy")
        self.legacy = True if legacy is None else legacy  # LlamaTokenizer.__init__ in 4.37: None means legacy
        decoder = {int(k): AddedToken(**v) for k, v in config.get("added_tokens_decoder", {}).items()}
        self.backend = SentencePieceBackend(
            vocab_file=str(path / "tokenizer.model"),
            legacy=self.legacy,
            bos_token=config.get("bos_token", "<s>"),
            eos_token=config.get("eos_token", "</s>"),
            unk_token=config.get("unk_token", "<unk>"),
            pad_token=config.get("pad_token"),
            added_tokens_decoder=decoder,
        )
        self.add_bos = config.get("add_bos_token", True)
        self.bos_token_id = self.backend.convert_tokens_to_ids("<s>")

    def tokenize(self, text: str) -> list[str]:
        if self.legacy or not text:
            return self.backend.tokenize(text)
        tokens = self.backend.tokenize("\u2581" + text.replace("\u2581", " "))
        if len(tokens) > 1 and tokens[0] == "\u2581" and tokens[1] in self.backend.all_special_tokens:
            tokens = tokens[1:]
        return tokens

    def __call__(self, text: str) -> list[int]:
        ids = self.backend.convert_tokens_to_ids(self.tokenize(text))
        return ([self.bos_token_id] if self.add_bos else []) + ids

    def image_prompt(self, prompt: str, num_image_tokens: int, image_token_id: int) -> list[int]:
        """Original LLaVA's ``tokenizer_image_token``, the -200 sentinel expanded to ``K`` placeholder ids."""
        chunks = [self(chunk) for chunk in prompt.split("<image>")]
        ids, offset = [], 0
        if chunks and chunks[0] and chunks[0][0] == self.bos_token_id:
            offset = 1
            ids.append(chunks[0][0])
        separator = [-200] * (offset + 1)
        interleaved = [x for chunk in chunks for x in (chunk, separator)][:-1]
        for x in interleaved:
            ids.extend(x[offset:])
        expanded: list[int] = []
        for i in ids:
            expanded.extend([image_token_id] * num_image_tokens if i == -200 else [i])
        return expanded
