"""The LLaMA sentencepiece tokenizer, with the ids original LLaVA feeds its model.

Encoding reproduces what transformers 4.37's slow ``LlamaTokenizer`` (the one original LLaVA loads) gives for a
string, including its two quirks that change ids:

- special-token strings written inside text (``</s>``, ``<s>``, a checkpoint's added tokens such as llava-hf's
  ``<pad>``) are cut out first and map straight to their ids; the text pieces around them are encoded on their own;
- the ``legacy`` flag of ``tokenizer_config.json`` (missing means ``True``): with ``legacy=True`` every text piece
  gets sentencepiece's dummy-prefix ``▁``, with ``legacy=False`` only the start of the string does.

:meth:`Tokenizer.encode` then applies original LLaVA's ``tokenizer_image_token`` rule on top: the prompt is split on
``<image>``, each chunk is encoded separately (so the text after an image starts with its own dummy-prefix ``▁``),
one BOS is kept at the start, and each marker becomes ``K`` placeholder ids.
"""

from __future__ import annotations

import codecs
import os
import re
from collections.abc import Iterable, Sequence

import torch

from .tokenizer_files import NO_DUMMY_PREFIX, AddedToken, add_dummy_prefix, read_tokenizer_dir

IMAGE_MARKER = "<image>"
"""The string that marks where an image goes in a prompt."""

_SPIECE_UNDERLINE = "\u2581"  # "▁", sentencepiece's visible space
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_IDS_CACHE_SIZE = 4096  # distinct texts remembered by encode_text before the memo starts over (a few MB at most)


class Tokenizer:
    """Sentencepiece LLaMA tokenizer with transformers-4.37-slow encoding and LLaVA's image-marker rule.

    Build it with :meth:`from_dir`. Ids of added tokens follow the sentencepiece vocabulary
    (``vocab_size`` counts both).
    """

    def __init__(
        self,
        model_proto: bytes,
        *,
        legacy: bool = True,
        added_tokens: Sequence[AddedToken] = (),
        bos_token: str | None = "<s>",
        eos_token: str | None = "</s>",
        unk_token: str | None = "<unk>",
        pad_token: str | None = None,
        additional_special_tokens: Sequence[str] = (),
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        source: str = "<in memory>",
    ) -> None:
        import sentencepiece as spm

        self.source = source
        self.legacy = bool(legacy)
        self.add_bos_token = bool(add_bos_token)
        self.add_eos_token = bool(add_eos_token)
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except (RuntimeError, OSError) as err:
            raise ValueError(f"{source}: not a sentencepiece model ({err})") from None
        self._dummy_prefix = add_dummy_prefix(model_proto)
        # Decoding drops the dummy-prefix space of the first piece, and for legacy tokenizers (which encode the text
        # after a written special token with a dummy prefix again) of the piece after a special token.
        self._prefix_after_special = self.legacy and self._dummy_prefix
        # Non-legacy encoding runs sentencepiece without the dummy prefix and adds "▁" itself where it belongs.
        self._sp_plain = (
            self._sp if self.legacy else spm.SentencePieceProcessor(model_proto=model_proto + NO_DUMMY_PREFIX)
        )
        n = self._sp.get_piece_size()
        self._init_vocabulary(
            pieces=[self._sp.id_to_piece(i) for i in range(n)],
            byte_ids={i for i in range(n) if self._sp.is_byte(i)},
            control_ids={i for i in range(n) if self._sp.is_control(i) or self._sp.is_unknown(i)},
            added_tokens=added_tokens,
            names={"bos": bos_token, "eos": eos_token, "unk": unk_token, "pad": pad_token},
            additional_special_tokens=additional_special_tokens,
        )
        self._unk_text = unk_token or "<unk>"
        self._unk_len = len(self._sp_plain.encode(self._unk_text))
        self._ids_cache: dict[str, tuple[int, ...]] = {}

    def _init_vocabulary(
        self,
        pieces: list[str],
        byte_ids: set[int],
        control_ids: set[int],
        added_tokens: Sequence[AddedToken],
        names: dict[str, str | None],
        additional_special_tokens: Sequence[str],
    ) -> None:
        """The tables shared by every backend: special and added tokens, token ids, and the decoding tables.

        ``pieces`` are the model's token strings by id (``▁`` for a space, ``<0xNN>`` for the ``byte_ids``);
        ``control_ids`` are pieces that decode to nothing when special tokens are skipped (``<s>``, ``<unk>``).
        """
        source = self.source
        self._pieces = pieces
        piece_ids = {piece: i for i, piece in enumerate(pieces)}
        self._added: dict[str, AddedToken] = {}
        for tok in added_tokens:
            self._added[tok.content] = tok
        specials = [t for t in (*names.values(), *additional_special_tokens) if t is not None]
        for content in specials:
            # As transformers does at init: special tokens not listed as added tokens are added, using the
            # model's id when the piece exists.
            if content in self._added:
                continue
            if content not in piece_ids:
                raise ValueError(
                    f"{source}: special token {content!r} is neither a piece of the model nor an added token; "
                    "list it in added_tokens_decoder of tokenizer_config.json"
                )
            self._added[content] = AddedToken(content, piece_ids[content])
        self._all_special_tokens = frozenset(specials)
        self._ids = {name: (None if tok is None else self._added[tok].id) for name, tok in names.items()}

        self._id_to_added = {tok.id: tok for tok in self._added.values()}
        self.vocab_size = max([len(pieces) - 1, *self._id_to_added]) + 1
        # Longest first, so that the regex alternation finds the longest token at each position like HF's trie.
        alternatives = sorted(self._added, key=len, reverse=True)
        self._added_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if alternatives else None
        # Token string -> id in one dict lookup (a sentencepiece call per piece was most of the encoding time);
        # added tokens take precedence over a piece of the same text, as they always did here.
        self._token_ids = {**piece_ids, **{tok.content: tok.id for tok in self._added.values()}}

        # Decoding tables: the bytes each piece stands for, whether it opens with the dummy-prefix space, and which
        # ids are special (dropped by skip_special_tokens).
        self._piece_bytes: list[bytes] = []
        self._piece_space: list[bool] = []
        for i, piece in enumerate(pieces):
            if i in byte_ids:
                self._piece_bytes.append(bytes([int(_BYTE_PIECE.fullmatch(piece).group(1), 16)]))
            else:
                self._piece_bytes.append(piece.replace(_SPIECE_UNDERLINE, " ").encode("utf-8"))
            self._piece_space.append(piece.startswith(_SPIECE_UNDERLINE))
        self._special_ids = {
            tok.id for tok in self._added.values() if tok.special or tok.content in self._all_special_tokens
        } | set(control_ids)
        self._extra_special: dict[int, str] = {}

    # --- construction ---

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> Tokenizer:
        """Read ``tokenizer.model`` and the transformers JSON files next to it.

        Reads ``tokenizer_config.json`` (``legacy``, ``add_bos_token``, ``add_eos_token``, special tokens,
        ``added_tokens_decoder``) and, as transformers does for older checkpoints without ``added_tokens_decoder``,
        ``special_tokens_map.json`` and ``added_tokens.json``. A directory with ``tokenizer.json`` but no
        ``tokenizer.model`` (what transformers 5 saves) gives a
        :class:`~minillava.tokenizer_json.JsonTokenizer`, which needs the ``tokenizers`` package.
        """
        args = read_tokenizer_dir(directory)
        if "tokenizer_json" in args:
            from .tokenizer_json import JsonTokenizer

            return JsonTokenizer(**args)
        return cls(**args)

    # --- ids of the special tokens ---

    @property
    def bos_token_id(self) -> int | None:
        return self._ids["bos"]

    @property
    def eos_token_id(self) -> int | None:
        return self._ids["eos"]

    @property
    def unk_token_id(self) -> int | None:
        return self._ids["unk"]

    @property
    def pad_token_id(self) -> int | None:
        return self._ids["pad"]

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        """The id of an added token or a sentencepiece piece, ``None`` if neither."""
        return self._token_ids.get(token)

    def add_special_id(self, token_id: int, text: str) -> None:
        """Make ``token_id`` decode as ``text`` and count as special (an image placeholder outside the vocabulary)."""
        if token_id not in self._special_ids and token_id < len(self._pieces):
            raise ValueError(f"id {token_id} is an ordinary piece of the model; it cannot become a special id")
        self._special_ids.add(token_id)
        self._extra_special[token_id] = text

    # --- encoding ---

    def _split_added(self, text: str) -> list[str]:
        """Transformers' added-token split, with each token's lstrip/rstrip/single_word rules."""
        if self._added_re is None:
            return [text]
        parts = [p for p in self._added_re.split(text) if p]
        for i, part in enumerate(parts):
            tok = self._added.get(part)
            if tok is None:
                continue
            left = parts[i - 1] if i > 0 else None
            right = parts[i + 1] if i < len(parts) - 1 else None
            if tok.rstrip and right:
                parts[i + 1] = right.lstrip()
            if tok.lstrip and left:
                parts[i - 1] = left.rstrip()
            if tok.single_word and left and left[-1] != " ":
                parts[i - 1] += part
                parts[i] = ""
            elif tok.single_word and right and right[0] != " ":
                parts[i] += right
                parts[i + 1] = ""
        return parts

    def _encode_piece_text(self, text: str) -> list[str]:
        if self.legacy or not text.startswith((_SPIECE_UNDERLINE, " ")):
            return self._sp_plain.encode(text, out_type=str)
        # Without a dummy prefix sentencepiece would drop a leading "▁"; encode behind the unk string and cut it off.
        pieces = self._sp_plain.encode(self._unk_text + text, out_type=str)
        return pieces[self._unk_len :] if len(pieces) >= self._unk_len else pieces

    def tokenize(self, text: str) -> list[str]:
        """The token strings of ``text`` without BOS/EOS (transformers 4.37 slow ``LlamaTokenizer.tokenize``)."""
        check_utf8(text)
        if not self.legacy and text:
            text = _SPIECE_UNDERLINE + text.replace(_SPIECE_UNDERLINE, " ")
        tokens: list[str] = []
        for part in self._split_added(text):
            if not part:
                continue
            if part in self._added:
                tokens.append(part)
            else:
                tokens.extend(self._encode_piece_text(part))
        if (
            not self.legacy
            and len(tokens) > 1
            and tokens[0] == _SPIECE_UNDERLINE
            and tokens[1] in self._all_special_tokens
        ):
            tokens = tokens[1:]
        return tokens

    def encode_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of one piece of text, as ``tokenizer(text).input_ids``: BOS/EOS per the checkpoint's flags."""
        ids = list(self._text_ids(text))
        if add_special_tokens:
            if self.add_bos_token and self.bos_token_id is not None:
                ids.insert(0, self.bos_token_id)
            if self.add_eos_token and self.eos_token_id is not None:
                ids.append(self.eos_token_id)
        return ids

    def _text_ids(self, text: str) -> tuple[int, ...]:
        # Training encodes every prefix of every conversation (labels.encode_supervised), and each prefix starts with
        # the same text before the image (system prompt, role): tokenising was most of the data loader's time, and
        # the ids depend on the text alone.
        ids = self._ids_cache.get(text)
        if ids is None:
            ids = self._encode(text)
            if len(self._ids_cache) >= _IDS_CACHE_SIZE:
                self._ids_cache.clear()
            self._ids_cache[text] = ids
        return ids

    def _encode(self, text: str) -> tuple[int, ...]:
        token_ids = self._token_ids
        # A string outside the vocabulary (no byte fallback) is what piece_to_id maps to <unk>.
        return tuple(token_ids[t] if t in token_ids else self._sp.piece_to_id(t) for t in self.tokenize(text))

    def encode(
        self,
        text: str,
        num_image_tokens: int | Sequence[int] = 0,
        image_token_id: int | None = None,
        *,
        add_special_tokens: bool = True,
    ) -> list[int]:
        """Ids of a prompt; each ``<image>`` becomes ``num_image_tokens`` copies of ``image_token_id`` (a list gives
        each marker its own count, in order: LLaVA-1.6 images differ).

        Original LLaVA's ``tokenizer_image_token``: split on ``<image>``, encode every chunk on its own (each with
        its dummy-prefix space), keep one BOS at the start.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        chunks = [self.encode_text(chunk, add_special_tokens) for chunk in text.split(IMAGE_MARKER)]
        markers = len(chunks) - 1
        counts = [num_image_tokens] * markers if isinstance(num_image_tokens, int) else list(num_image_tokens)
        if markers and (image_token_id is None or not all(c >= 1 for c in counts)):
            raise ValueError(
                f"the text has {markers} {IMAGE_MARKER} marker(s) but no image_token_id/num_image_tokens "
                "were given; use the Processor, which knows the checkpoint's values"
            )
        if len(counts) != markers:
            raise ValueError(f"the text has {markers} {IMAGE_MARKER} marker(s) but {len(counts)} image token counts")
        ids: list[int] = []
        offset = 0
        # The reference keeps the first chunk's leading BOS and drops the first id of every chunk after it.
        if chunks[0] and chunks[0][0] == self.bos_token_id:
            offset = 1
            ids.append(chunks[0][0])
        for i, chunk in enumerate(chunks):
            if i:
                ids.extend([image_token_id] * counts[i - 1])
            ids.extend(chunk[offset:])
        return ids

    # --- decoding ---

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``. Byte pieces are joined into UTF-8 (invalid sequences become U+FFFD), the dummy-prefix
        space of the first piece is dropped (and, for legacy tokenizers, of the piece after a written special token).
        Ids past the vocabulary (a padded embedding's spare rows) decode to nothing."""
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        state = _ByteState(self, skip_special_tokens)
        return b"".join(state.feed(i) for i in ids).decode("utf-8", errors="replace")

    def incremental_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        """A streaming decoder whose pieces join into exactly ``decode(all_ids, skip_special_tokens)``."""
        return IncrementalDecoder(self, skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        """Whether ``skip_special_tokens`` drops ``token_id``."""
        return token_id in self._special_ids


def check_utf8(text: str) -> None:
    """Raise ``ValueError`` when ``text`` cannot be written as UTF-8: it holds a lone surrogate, which is how Python
    passes on bytes it could not decode (a command-line argument or a line of input in another encoding)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        char = text[err.start]
        origin = f" (the byte 0x{ord(char) - 0xDC00:02x}, left undecoded)" if 0xDC80 <= ord(char) <= 0xDCFF else ""
        raise ValueError(
            f"the text is not valid UTF-8: character {err.start} is {char!r}{origin}; give the text in UTF-8 (check "
            "the encoding of the terminal or file it came from)"
        ) from None


class _ByteState:
    """Turns ids into UTF-8 bytes one at a time; shared by decode and the streaming decoder so they cannot drift."""

    def __init__(self, tok: Tokenizer, skip_special_tokens: bool) -> None:
        self.tok = tok
        self.skip = skip_special_tokens
        self.at_start = tok._dummy_prefix  # the next text piece is the first: drop its dummy-prefix space

    def feed(self, token_id: int) -> bytes:
        tok = self.tok
        token_id = int(token_id)
        if token_id < 0:
            raise ValueError(f"cannot decode negative id {token_id} (a label mask or the -200 image sentinel?)")
        added = tok._id_to_added.get(token_id)
        if token_id in tok._special_ids:
            if self.skip:
                return b""
            if token_id in tok._extra_special:
                text = tok._extra_special[token_id]
            else:
                text = added.content if added is not None else tok._pieces[token_id]
            self.at_start = tok._prefix_after_special
            return text.encode("utf-8")
        if added is not None:  # a non-special added token is plain text
            self.at_start = False
            return added.content.encode("utf-8")
        if token_id >= len(tok._piece_bytes):
            return b""  # past the vocabulary (a padded embedding's spare rows): no text
        data = tok._piece_bytes[token_id]
        if self.at_start and tok._piece_space[token_id]:
            data = data[1:]
        self.at_start = False
        return data


class IncrementalDecoder:
    """Streaming detokenisation: :meth:`push` ids as they are generated, get text as soon as it is final.

    Text is emitted piece by piece; a multi-byte character split over byte-fallback pieces is held back until
    complete. The pushed pieces plus :meth:`flush` equal :meth:`Tokenizer.decode` of all ids.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._state = _ByteState(tokenizer, skip_special_tokens)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: int | Iterable[int] | torch.Tensor) -> str:
        """Add one id or several; return the text that became final."""
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        elif isinstance(ids, int):
            ids = [ids]
        return self._utf8.decode(b"".join(self._state.feed(i) for i in ids))

    def flush(self) -> str:
        """End of stream: return what is held back (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


def pad_batch(
    sequences: Sequence[Sequence[int] | torch.Tensor], pad_id: int, padding_side: str = "left"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists to one length: ``(input_ids, attention_mask)``, both int64 ``[B, L]``; the mask is 1 on real
    tokens. Left padding is what generation wants (the last column is every row's last token), right padding is
    what training wants."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not sequences:
        raise ValueError("nothing to pad: the batch is empty")
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq) == 0:
            continue
        span = slice(length - len(seq), length) if padding_side == "left" else slice(0, len(seq))
        input_ids[row, span] = torch.as_tensor(seq if isinstance(seq, torch.Tensor) else list(seq), dtype=torch.long)
        mask[row, span] = 1
    return input_ids, mask
