"""A LLaMA-style sentencepiece tokenizer trained on the shapes set's own text.

The options are LLaMA's (BPE, byte fallback, digits split, dummy prefix, identity normalisation,
``<unk>``/``<s>``/``</s>`` at ids 0/1/2, no pad piece), so minillava's tokenizer code treats it
like a real LLaVA-1.5 one. Differences: ``<image>`` is a user-defined piece (id 3), so the
placeholder is always one token whether the caller splits on it or tokenises it; the training text
is whole vicuna_v1 chats, so the system prompt, ``USER:`` and ``ASSISTANT:`` come out in few tokens;
and the newline is a piece of its own (LLaMA spells it with the byte token ``<0x0A>``). Training is
single-threaded on unshuffled input with a fixed seed, so the same text gives a byte-identical
``tokenizer.model``.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from minillava.shapes.data import conversation, make_sample, sample_rng

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
IMAGE_TOKEN = "<image>"
# 256 byte pieces, 4 specials, ~45 characters, and merges enough for every word of the set to be
# one piece, with some to spare; above ~840 sentencepiece runs out of merges on this little text.
DEFAULT_VOCAB_SIZE = 640


LLAMA_SENTENCEPIECE = dict(
    model_type="bpe",
    character_coverage=1.0,  # the training text is small: keep every character
    byte_fallback=True,
    split_digits=True,
    split_by_unicode_script=True,
    split_by_whitespace=True,
    split_by_number=True,
    treat_whitespace_as_suffix=False,
    allow_whitespace_only_pieces=True,
    max_sentencepiece_length=16,
    add_dummy_prefix=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    hard_vocab_limit=True,
    # Determinism: one thread, every sentence, in order, fixed seed.
    num_threads=1,
    input_sentence_size=0,
    shuffle_input_sentence=False,
    seed_sentencepiece_size=1000000,
    minloglevel=2,
)
"""LLaMA's sentencepiece trainer options (BPE, byte fallback, split digits, dummy prefix, identity normalisation,
``<unk>``/``<s>``/``</s>`` = 0/1/2, no pad piece), set for byte-identical output from the same text."""


def train_sentencepiece(sentences: Iterable[str], vocab_size: int, **overrides) -> bytes:
    """A serialized LLaMA-style sentencepiece model (:data:`LLAMA_SENTENCEPIECE`, then ``overrides``) trained on
    ``sentences``; the same sentences give the same bytes."""
    model = io.BytesIO()
    # BPE training draws nothing random once shuffling is off; pin sentencepiece's seed regardless.
    spm.set_random_generator_seed(0)
    options = {**LLAMA_SENTENCEPIECE, **overrides}
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(sentences)), model_writer=model, vocab_size=vocab_size, **options
    )
    return model.getvalue()


def vicuna_v1_text(conversations: list[dict[str, str]], system: str = VICUNA_V1_SYSTEM) -> str:
    """A LLaVA conversation in the vicuna_v1 template, as the model sees it (``</s>`` after each answer)."""
    text = system + " "
    for turn in conversations:
        if turn["from"] == "human":
            text += f"USER: {turn['value']} "
        else:
            text += f"ASSISTANT: {turn['value']}</s>"
    return text


def dataset_texts(n_images: int, seed: int, image_size: int = 64) -> list[str]:
    """Tokenizer training text: vicuna_v1 chats and captions of the first ``n_images`` train images."""
    texts = []
    for index in range(n_images):
        _, turns, caption = make_sample(sample_rng(seed, "train", index), image_size)
        texts.append(vicuna_v1_text(conversation(turns)))
        texts.append(caption)
    return texts


def _sentences(texts: Iterable[str]) -> Iterable[str]:
    # "</s>" is a control symbol, never text. Text after it is encoded with no dummy prefix ("</s>USER:"),
    # as is the question after "<image>\n"; a newline in its place lets sentencepiece learn those
    # pieces ("USER", "What") as the model will see them. Newlines thus become a piece of their own.
    for text in texts:
        text = text.replace("</s>", "\n").strip("\n")
        if text.strip():
            yield text


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    model_max_length: int = 512,
) -> Path:
    """Train on ``texts`` and write ``tokenizer.model``, ``tokenizer_config.json`` and
    ``special_tokens_map.json`` into ``out_dir``; returns the path of ``tokenizer.model``."""
    model = train_sentencepiece(_sentences(texts), vocab_size, user_defined_symbols=[IMAGE_TOKEN])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tokenizer.model"
    path.write_bytes(model)
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        **special,
        "image_token": IMAGE_TOKEN,
        "model_max_length": model_max_length,
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return path
