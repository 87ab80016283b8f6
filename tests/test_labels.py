"""Label masks from conversations, token by token against original LLaVA's preprocessing rule.

The reference below is ``preprocess_v1`` / ``preprocess_plain`` of haotian-liu/LLaVA ``train/train.py``
written out literally (rounds split on ``</s>``, ``instruction_len = len(tok(parts[0] + sep)) - 2``, the
``-1`` for later rounds of non-legacy tokenizers, the ``-200`` sentinel per image), run with transformers'
tokenizer on a real LLaMA-style sentencepiece model. Its ``-200`` becomes ``K`` placeholder ids with
label ``-100``, as the original's fusion does.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from minillava.chat import ChatTemplate
from minillava.config import ImageConfig
from minillava.labels import (
    SampleTooLong,
    TokenizationMismatch,
    supervised_segments,
    training_example,
    truncate,
)
from minillava.model import IGNORE_INDEX
from minillava.processor import Processor
from minillava.tokenizer import Tokenizer
from tests.sp_fixtures import SYSTEM_PROMPTS, VOCAB_SIZE, write_tokenizer_dir

K = 5
IMAGE_ID = VOCAB_SIZE  # llava-hf style: <image> is the first added token
SENTINEL = -200
SYSTEMS = {"vicuna_v1": SYSTEM_PROMPTS[0], "llava_v1": SYSTEM_PROMPTS[1]}

TWO_TURNS_IMAGE = [
    {"from": "human", "value": "<image>\nWhat is the color of the cat on the left?"},
    {"from": "gpt", "value": "The cat on the left is red."},
    {"from": "human", "value": "How many dogs are there?"},
    {"from": "gpt", "value": "There are 3 dogs sitting at the table."},
]
TWO_TURNS_TEXT = [
    {"from": "human", "value": "Describe a street with people."},
    {"from": "gpt", "value": "A man is standing on the street, holding a blue car."},
    {"from": "human", "value": "Where is the tree?"},
    {"from": "gpt", "value": "At the top left."},
]
CAPTION = [
    {"from": "human", "value": "<image>\nDescribe the image briefly."},
    {"from": "gpt", "value": "A small red cat sitting on a table."},
]


# --- the original rule, literally ---


def ref_tokenizer_image_token(hf_tok, prompt: str) -> list[int]:
    """mm_utils.tokenizer_image_token with the -200 sentinel."""
    chunks = [hf_tok(chunk).input_ids for chunk in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == hf_tok.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    sep = [SENTINEL] * (offset + 1)
    for x in [e for pair in zip(chunks, [sep] * len(chunks), strict=True) for e in pair][:-1]:
        ids.extend(x[offset:])
    return ids


def ref_prompt_two(system: str, source: list[dict]) -> str:
    """conversation.py SeparatorStyle.TWO get_prompt for finished turns."""
    seps = [" ", "</s>"]
    ret = system + seps[0]
    for i, sentence in enumerate(source):
        role = ("USER", "ASSISTANT")[i % 2]
        ret += role + ": " + sentence["value"] + seps[i % 2]
    return ret


def ref_preprocess_v1(hf_tok, legacy: bool, system: str, source: list[dict], has_image: bool):
    conversation = ref_prompt_two(system, source)

    def tok(text):
        return ref_tokenizer_image_token(hf_tok, text) if has_image else hf_tok(text).input_ids

    input_ids = tok(conversation)
    target = list(input_ids)
    total_len = sum(t != hf_tok.pad_token_id for t in target)
    sep = " " + "ASSISTANT" + ": "
    rounds = conversation.split("</s>")
    cur_len = 1
    target[:cur_len] = [IGNORE_INDEX] * cur_len
    for i, rou in enumerate(rounds):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(tok(rou))
        instruction_len = len(tok(parts[0])) - 2
        if i != 0 and not legacy:  # IS_TOKENIZER_GREATER_THAN_0_14 (LLaVA pins tokenizers 0.15.1)
            round_len -= 1
            instruction_len -= 1
        target[cur_len : cur_len + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur_len += round_len
    target[cur_len:] = [IGNORE_INDEX] * (len(target) - cur_len)
    mismatch = cur_len != total_len
    if mismatch:
        target = [IGNORE_INDEX] * len(target)  # "WARNING: tokenization mismatch ... (ignored)"
    return input_ids, target, mismatch


def ref_preprocess_plain(hf_tok, source: list[dict]):
    assert len(source) == 2 and "<image>" in source[0]["value"]
    first = "<image>"
    conversation = first + source[1]["value"] + "\n"
    input_ids = ref_tokenizer_image_token(hf_tok, conversation)
    target = list(input_ids)
    n = len(ref_tokenizer_image_token(hf_tok, first))
    target[:n] = [IGNORE_INDEX] * n
    return input_ids, target


def expand(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """The original's fusion: each -200 becomes K image rows with label -100."""
    out_ids, out_labels = [], []
    for t, lab in zip(ids, labels, strict=True):
        if t == SENTINEL:
            out_ids += [IMAGE_ID] * K
            out_labels += [IGNORE_INDEX] * K
        else:
            out_ids.append(t)
            out_labels.append(lab)
    return out_ids, out_labels


# --- fixtures ---


@pytest.fixture(scope="module", params=[True, False], ids=["legacy", "non-legacy"])
def toks(request, tmp_path_factory):
    from transformers import AutoTokenizer

    directory = write_tokenizer_dir(tmp_path_factory.mktemp("tok"), legacy=request.param)
    tok = Tokenizer.from_dir(directory)
    image = ImageConfig(shortest_edge=28, crop_size=28)
    proc = Processor(tok, image, image_token_id=IMAGE_ID, num_image_tokens=K, template="vicuna_v1")
    return request.param, AutoTokenizer.from_pretrained(directory), proc


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    directory = write_tokenizer_dir(tmp_path_factory.mktemp("tok1"), legacy=False)
    image = ImageConfig(shortest_edge=28, crop_size=28)
    return Processor(Tokenizer.from_dir(directory), image, image_token_id=IMAGE_ID, num_image_tokens=K)


def messages(source: list[dict]) -> list[dict]:
    return [{"role": "user" if s["from"] == "human" else "assistant", "content": s["value"]} for s in source]


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "cat.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(path)
    return path


def supervised_runs(labels: list[int]) -> list[list[int]]:
    runs, current = [], []
    for lab in labels:
        if lab == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(lab)
    return runs + ([current] if current else [])


# --- token by token against the original ---


@pytest.mark.parametrize("template", ["vicuna_v1", "llava_v1"])
@pytest.mark.parametrize("source", [TWO_TURNS_IMAGE, TWO_TURNS_TEXT], ids=["image", "text"])
def test_two_turns_match_original_rule(toks, template, source, image_file):
    legacy, hf_tok, proc = toks
    has_image = "<image>" in source[0]["value"]
    ref_ids, ref_labels, mismatch = ref_preprocess_v1(hf_tok, legacy, SYSTEMS[template], source, has_image)
    ref_ids, ref_labels = expand(ref_ids, ref_labels)
    ex = training_example(proc, messages(source), [image_file] if has_image else None, template=template)
    assert ex["input_ids"].tolist() == ref_ids
    # The supervised tokens are the answers, each with its </s>: nothing else, nothing less.
    runs = [proc.tokenizer.decode(run) for run in supervised_runs(ex["labels"].tolist())]
    assert runs == [turn["value"] + "</s>" for turn in source[1::2]]
    if mismatch:
        # The original's "-1 for later rounds of non-legacy tokenizers" fits LLaMA's vocabulary ("USER" is one
        # piece, "▁USER" two), not this one; it then masks the whole sample. Ours supervises exactly the answers.
        assert not legacy
        assert all(lab == IGNORE_INDEX for lab in ref_labels)
        first_round = ref_preprocess_v1(hf_tok, legacy, SYSTEMS[template], source[:2], has_image)
        assert not first_round[2]
        assert ex["labels"].tolist()[: len(expand(*first_round[:2])[1])] == expand(*first_round[:2])[1]
    else:
        assert ex["labels"].tolist() == ref_labels
    if has_image:
        assert ex["pixel_values"].shape == (1, 3, 28, 28)
        assert (ex["labels"][ex["input_ids"] == IMAGE_ID] == IGNORE_INDEX).all()
    else:
        assert ex["pixel_values"] is None


def test_plain_caption_matches_original_rule(toks, image_file):
    _, hf_tok, proc = toks
    ref_ids, ref_labels = expand(*ref_preprocess_plain(hf_tok, CAPTION))
    ex = training_example(proc, messages(CAPTION), [image_file], template="plain")
    assert ex["input_ids"].tolist() == ref_ids
    assert ex["labels"].tolist() == ref_labels
    # The question text is dropped (stage 1 is captioning); caption and its "\n" are supervised.
    assert proc.tokenizer.decode(supervised_runs(ex["labels"].tolist())[0]) == CAPTION[1]["value"] + "\n"


# --- pieces and errors ---


def test_segments_alternate_and_spaces_move_forward():
    segs = supervised_segments(messages(TWO_TURNS_TEXT), "vicuna_v1")
    assert [a for _, a in segs] == [False, True, False, True]
    assert segs[0][0].endswith("ASSISTANT:") and segs[1][0] == " " + TWO_TURNS_TEXT[1]["value"] + "</s>"


def test_not_alternating_is_named(proc):
    bad = [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]
    with pytest.raises(ValueError, match=r"sample 'abc'.*expected an? assistant message"):
        training_example(proc, bad, sample_id="abc")


def test_no_assistant_turn_is_named(proc):
    with pytest.raises(ValueError, match=r"sample 7: .*no assistant turn"):
        training_example(proc, [{"role": "user", "content": "hi"}], sample_id=7)


def test_marker_and_image_counts_must_agree(proc, image_file):
    with pytest.raises(ValueError, match=r"sample 's1'.*1 <image> marker\(s\) but 0 image"):
        training_example(proc, messages(CAPTION), None, template="vicuna_v1", sample_id="s1")


def test_missing_image_names_sample_and_file(proc, tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match=r"sample 'm1'.*nope\.jpg"):
        training_example(proc, messages(CAPTION), [missing], sample_id="m1")


def test_corrupt_image_names_sample_and_file(proc, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(OSError, match=r"sample 'c1'.*broken\.png"):
        training_example(proc, messages(CAPTION), [bad], sample_id="c1")


def test_tokenization_mismatch_raises_naming_the_sample(proc):
    # A role string that stops mid-word: "ASSIS" + "TANT ..." tokenises differently alone and in the whole.
    odd = ChatTemplate("odd", "mpt", "", ("USER: ", "ASSIS"), "\n", None, ("\n",))
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "TANT: the cat is red"}]
    with pytest.raises(TokenizationMismatch, match=r"sample 'tm'.*tokenization mismatch"):
        training_example(proc, msgs, template=odd, sample_id="tm")


def test_too_long_is_refused_or_cut_outside_images(proc, image_file):
    source = [{"from": "human", "value": "What is this?\n<image>\n<image>"}, {"from": "gpt", "value": "Two cats."}]
    msgs = messages(source)
    full = training_example(proc, msgs, [image_file, image_file], template="vicuna_v1")
    ids = full["input_ids"].tolist()
    first = ids.index(IMAGE_ID)
    with pytest.raises(SampleTooLong, match=r"sample 'long'.*longer than max_length"):
        training_example(
            proc, msgs, [image_file] * 2, template="vicuna_v1", sample_id="long", max_length=10, refuse_long=True
        )
    # A cut inside the second image's placeholders drops that image whole (and keeps the first).
    second = ids.index(IMAGE_ID, first + K)
    assert second > first + K, "the two images are separated by text"
    cut_ids, cut_labels, kept = truncate(ids, full["labels"].tolist(), second + 2, IMAGE_ID, K)
    assert kept == 1 and cut_ids == ids[:second] and len(cut_labels) == len(cut_ids)
    cut_ids, _, kept = truncate(ids, full["labels"].tolist(), first + 3, IMAGE_ID, K)
    assert kept == 0 and cut_ids == ids[:first]
    # Cutting away every answer token leaves nothing to learn: refused.
    with pytest.raises(SampleTooLong, match=r"nothing supervised"):
        training_example(proc, msgs, [image_file] * 2, template="vicuna_v1", sample_id="x", max_length=first + 2 * K)


def test_truncated_example_keeps_placeholders_and_pixels_consistent(proc, image_file):
    source = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat. " * 20}]
    full = training_example(proc, messages(source), [image_file], template="vicuna_v1")
    ex = training_example(
        proc, messages(source), [image_file], template="vicuna_v1", max_length=len(full["input_ids"]) - 9
    )
    assert ex["input_ids"].tolist() == full["input_ids"][:-9].tolist()
    assert ex["labels"].tolist() == full["labels"][:-9].tolist()
    assert int((ex["input_ids"] == IMAGE_ID).sum()) == K * ex["pixel_values"].shape[0]


def test_llava_json_roundtrip_of_labels_is_plain_ints(proc):
    ex = training_example(proc, messages(TWO_TURNS_TEXT), template="llava_v1")
    assert ex["input_ids"].dtype == torch.long and ex["labels"].dtype == torch.long
    json.dumps(ex["labels"].tolist())
