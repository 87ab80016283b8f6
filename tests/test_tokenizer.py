"""Tokenizer: ids identical to the slow LlamaTokenizer under LLaVA's chunk rule; decoding and streaming."""

import json
import random

import pytest
import sentencepiece as spm
import torch

from minillava.chat import TEMPLATES, format_chat
from minillava.tokenizer import Tokenizer, pad_batch
from tests.sp_fixtures import VOCAB_SIZE, SlowLlamaReference, sp_model_bytes, write_tokenizer_dir

K = 3  # placeholders per image; small so that failures print readably
IMAGE_ID = VOCAB_SIZE  # llava-hf layout: <image> is the first added token


@pytest.fixture(
    scope="module", params=["legacy", "non_legacy", "legacy_missing", "original_layout", "squeeze", "squeeze_legacy"]
)
def pair(request, tmp_path_factory):
    """(ours, slow reference, image id) for one tokenizer directory flavour."""
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "original_layout":  # liuhaotian: no added tokens, placeholder past the vocabulary
        write_tokenizer_dir(path, added_tokens=(), pad_token=None, legacy=False)
    elif request.param.startswith("squeeze"):  # not LLaMA: a model that squeezes whitespace
        write_tokenizer_dir(path, legacy=request.param.endswith("legacy"), remove_extra_whitespaces=True)
    else:
        legacy = {"legacy": True, "non_legacy": False, "legacy_missing": None}[request.param]
        write_tokenizer_dir(path, legacy=legacy)
    return Tokenizer.from_dir(path), SlowLlamaReference(path), IMAGE_ID


def _conversation(template):
    """Three user turns with an image at the start, the middle and the end; Unicode, digits, special strings."""
    return [
        {"role": "user", "content": "<image>\nWhat is in the picture? 日本 café 😀 12345"},
        {"role": "assistant", "content": "A cat — 3 of them, naïve 猫.  Two  spaces."},
        {"role": "user", "content": "Compare <image> with this one, 2024-01-31."},
        {"role": "assistant", "content": "They differ in 42 ways </s> and <s> and <pad>."},
        {"role": "user", "content": "And the last one: <image>"},
    ]


PROMPTS = [format_chat(_conversation(name), name) for name in TEMPLATES] + [
    "<image>",
    "<image><image>",
    "Describe <image>",
    " <image> leading space",
    "<image> ASSISTANT:",
    "no image at all, 0.5 + 1/3 = ?",
    "\n\n<image>\n\n",
    "</s>USER: <image>\nhi</s>",
    "<s>[INST] <image>\nq [/INST]",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompt_ids_match_the_slow_tokenizer_chunk_rule(pair, prompt):
    ours, reference, image_id = pair
    assert ours.encode(prompt, K, image_id) == reference.image_prompt(prompt, K, image_id)


def test_random_text_matches_the_slow_tokenizer(pair):
    ours, reference, _ = pair
    rng = random.Random(0)
    alphabet = list("ab cd\n\t12日😀é▁:.") + ["</s>", "<s>", "<pad>", "<unk>", "  ", "USER", " ASSISTANT:"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        assert ours.encode_text(text) == reference(text), repr(text)


def test_image_marker_rule_by_hand(tmp_path):
    tok = Tokenizer.from_dir(write_tokenizer_dir(tmp_path, legacy=False))
    sp = spm.SentencePieceProcessor(model_proto=sp_model_bytes())
    ids = tok.encode("USER: <image>\nWhat? ASSISTANT:", K, IMAGE_ID)
    # One BOS; the text after the image is encoded on its own, so it opens with the dummy-prefix "▁" before "\n".
    first = sp.encode("USER: ")
    rest = sp.encode("\nWhat? ASSISTANT:")
    assert ids == [1, *first, *[IMAGE_ID] * K, *rest]
    assert sp.id_to_piece(first[-1]) == "▁" and sp.id_to_piece(rest[0]) == "▁" and rest[1] == 13  # <0x0A>


def test_special_token_strings_map_to_their_ids(tmp_path):
    tok = Tokenizer.from_dir(write_tokenizer_dir(tmp_path, legacy=False))
    ids = tok.encode_text("a</s>b<s>c<pad>d<unk>", add_special_tokens=False)
    assert [i for i in ids if i in (0, 1, 2, VOCAB_SIZE + 1)] == [2, 1, VOCAB_SIZE + 1, 0]
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (1, 2, 0, VOCAB_SIZE + 1)
    assert tok.token_to_id("<image>") == VOCAB_SIZE and len(tok) == VOCAB_SIZE + 2


def test_repeated_text_gives_equal_independent_ids(tmp_path):
    # encode_text remembers the ids of texts it has seen (training encodes every prefix of a conversation, each
    # starting with the same system prompt).
    tok = Tokenizer.from_dir(write_tokenizer_dir(tmp_path, legacy=False))
    text = "Hello</s>USER: hi"
    first = tok.encode_text(text)
    first.append(-1)  # a caller's edit must not leak into the next answer
    assert tok.encode_text(text) == first[:-1] == tok.encode_text(text, add_special_tokens=True)
    assert tok.encode_text(text, add_special_tokens=False) == first[1:-1]


def test_legacy_flag_changes_ids_after_special_tokens(tmp_path):
    legacy = Tokenizer.from_dir(write_tokenizer_dir(tmp_path / "a", legacy=True))
    modern = Tokenizer.from_dir(write_tokenizer_dir(tmp_path / "b", legacy=False))
    missing = Tokenizer.from_dir(write_tokenizer_dir(tmp_path / "c", legacy=None))
    text = "Hello</s>USER: hi"
    assert legacy.encode_text(text) != modern.encode_text(text)
    assert missing.legacy and missing.encode_text(text) == legacy.encode_text(text)  # missing means legacy=True
    # A lone chunk is the same either way.
    assert legacy.encode_text("USER: hi") == modern.encode_text("USER: hi")


def test_transformers5_fast_tokenizer_differs_on_leading_spaces(tmp_path):
    """Fact for docs/inputs.md: transformers 5's AutoTokenizer is not the slow tokenizer on chunks opening with a space.

    Original LLaVA gets such chunks whenever text follows an image without a newline ("<image> ASSISTANT:").
    """
    from transformers import AutoTokenizer

    path = write_tokenizer_dir(tmp_path, legacy=False)
    ours, fast = Tokenizer.from_dir(path), AutoTokenizer.from_pretrained(path)
    assert ours.encode_text("\nWhat is it? ASSISTANT:") == fast("\nWhat is it? ASSISTANT:").input_ids
    assert ours.tokenize(" ASSISTANT:") == ["▁", "▁ASSISTANT", ":"]  # sentencepiece: dummy prefix + the space
    assert fast.convert_ids_to_tokens(fast(" ASSISTANT:").input_ids) == ["<s>", "▁ASSISTANT", ":"]


def test_added_tokens_json_without_added_tokens_decoder(tmp_path):
    path = write_tokenizer_dir(tmp_path, legacy=False, added_tokens_json=True)
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"], config["pad_token"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(path)
    assert tok.token_to_id("<image>") == VOCAB_SIZE and tok.pad_token_id == VOCAB_SIZE + 1  # from special_tokens_map
    assert tok.encode_text("a<pad>", add_special_tokens=False)[-1] == VOCAB_SIZE + 1


def test_older_checkpoint_takes_special_tokens_from_the_map(tmp_path):
    """Vicuna/original LLaVA: no added_tokens_decoder, pad_token null in the config, "<unk>" in the map."""
    path = write_tokenizer_dir(tmp_path, added_tokens=(), pad_token=None, legacy=False)
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "pad_token": "<unk>"}))
    tok = Tokenizer.from_dir(path)
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 0, 1, 2)


def test_loading_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        Tokenizer.from_dir(tmp_path)
    path = write_tokenizer_dir(tmp_path / "t")
    (path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="tokenizer_config.json: not valid JSON"):
        Tokenizer.from_dir(path)


def test_encode_errors(pair):
    ours, _, _ = pair
    with pytest.raises(ValueError, match="1 <image> marker"):
        ours.encode("look: <image>")
    with pytest.raises(TypeError, match="must be a str"):
        ours.encode(b"bytes")


# --- decoding ---

ADVERSARIAL = [
    "😀 hello 世界",
    "  two leading spaces",
    " one leading space",
    "   ",
    "日本語のテキストです",
    "mixed 😀😀 emoji🎉 and 🏳️‍🌈 flags",
    "a\n\nb\tc",
    "combining e\u0301 and zero\u200bwidth",
    "trailing space ",
    "digits 1234567890 and 3.14",
    "Ünïcödé ñ ß ø",
    "\U0001f600\U0001f600\U0001f600",
    "x",
    "",
]


@pytest.fixture(scope="module", params=[True, False], ids=["legacy", "non_legacy"])
def tok(request, tmp_path_factory):
    return Tokenizer.from_dir(write_tokenizer_dir(tmp_path_factory.mktemp("dec"), legacy=request.param))


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_decode_round_trips_and_matches_sentencepiece(tok, text):
    ids = tok.encode_text(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    sp = spm.SentencePieceProcessor(model_proto=sp_model_bytes())
    assert tok.decode(ids) == sp.decode(ids)


def test_decode_special_tokens(tok):
    hello = tok.encode_text("Hello there", add_special_tokens=False)
    ids = [1, *hello, 2, VOCAB_SIZE, VOCAB_SIZE + 1]
    assert tok.decode(ids, skip_special_tokens=True) == "Hello there"  # no spurious leading space
    kept = tok.decode(ids)
    assert kept.endswith("Hello there</s><image><pad>") and kept.startswith("<s>")
    assert tok.decode(torch.tensor([ids])) == kept
    assert tok.decode([*hello, 5000], skip_special_tokens=True) == "Hello there"  # a padded embedding's spare row
    with pytest.raises(ValueError, match="negative id -200"):
        tok.decode([1, -200, 5])


def test_byte_fallback_joins_into_utf8(tok):
    sp = spm.SentencePieceProcessor(model_proto=sp_model_bytes())
    ids = tok.encode_text("😀", add_special_tokens=False)
    assert [sp.is_byte(i) for i in ids] == [False, True, True, True, True]  # "▁" then four byte pieces
    assert tok.decode(ids) == "😀"
    assert tok.decode(ids[:3]) == "\ufffd"  # an incomplete character is replaced, not dropped or split


def _stream(tok, ids, skip=True):
    dec = tok.incremental_decoder(skip_special_tokens=skip)
    pieces = [dec.push(i) for i in ids]
    return pieces, dec.flush()


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_streaming_emits_stable_text_as_soon_as_possible(tok, text):
    ids = [1, *tok.encode_text(text, add_special_tokens=False), 2]
    pieces, tail = _stream(tok, ids)
    assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=True) == text
    assert tail == ""
    assert not any("\ufffd" in piece for piece in pieces)  # never a split multi-byte character
    for k in range(len(ids) + 1):  # after each id, everything but an incomplete trailing character is out
        assert "".join(pieces[:k]) == tok.decode(ids[:k], skip_special_tokens=True).rstrip("\ufffd")


def test_streaming_equals_decode_on_random_ids(tok):
    rng = random.Random(1)
    pool = [*range(3, 259), *range(259, VOCAB_SIZE), 0, 1, 2, VOCAB_SIZE, VOCAB_SIZE + 1, VOCAB_SIZE + 7]
    for _ in range(200):
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 30))]
        for skip in (True, False):
            pieces, tail = _stream(tok, ids, skip)
            assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=skip)


def test_streaming_accepts_tensors_and_lists(tok):
    ids = tok.encode_text("streaming 😀 works", add_special_tokens=False)
    dec = tok.incremental_decoder()
    text = dec.push(torch.tensor(ids[:4])) + dec.push(ids[4:]) + dec.flush()
    assert text == "streaming 😀 works"


# --- padding ---


def test_pad_batch_left_and_right():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, padding_side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=9, padding_side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
        pad_batch([[1]], 0, "middle")
