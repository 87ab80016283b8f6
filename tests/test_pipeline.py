"""Pipeline: text out of a checkpoint directory; streaming, stop strings, batches and multi-turn cache reuse."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from minillava.generate import generate
from minillava.pipeline import Pipeline
from minillava.textrow import TextRow


@pytest.fixture(scope="module")
def ckpt(chat_checkpoint) -> Path:
    return chat_checkpoint


@pytest.fixture(scope="module")
def pipe(ckpt) -> Pipeline:
    return Pipeline(ckpt)


def test_chat_equals_token_generation_decoded(pipe, images):
    answer = pipe.chat("What is in this image?", images=images[:1], max_new_tokens=20)
    text = pipe.template.format([{"role": "user", "content": "<image>\nWhat is in this image?"}])
    batch = pipe.processor(text, images=images[:1])
    tokens = generate(pipe.model, batch["input_ids"], batch["pixel_values"], max_new_tokens=20)[0].tolist()
    if 2 in tokens:
        tokens = tokens[: tokens.index(2)]
    assert len(tokens) > 3, "the random model should say something"
    assert answer == pipe.processor.decode(tokens)


def test_stream_pieces_join_to_the_answer(pipe, images):
    kwargs = dict(images=images, max_new_tokens=24, temperature=0.9, seed=3)
    pieces = list(pipe.stream("Compare <image> and <image>.", **kwargs))
    assert len(pieces) > 3
    assert "".join(pieces) == pipe.chat("Compare <image> and <image>.", **kwargs)


def test_stop_string_is_cut_and_ends_generation(ckpt, images):
    free = Pipeline(ckpt)
    answer = free.chat("Describe the image.", images=images[:1], max_new_tokens=30)
    assert len(answer) > 8
    stop = answer[4:7]  # a stop string in the middle of the free answer, likely spanning tokens
    template = dataclasses.replace(free.template, stop_strings=(stop,))
    stopped = Pipeline(ckpt, template=template)
    steps = []
    generate_steps = stopped._steps
    stopped._steps = lambda *a, **k: (steps.append(1) or t for t in generate_steps(*a, **k))
    cut = stopped.chat("Describe the image.", images=images[:1], max_new_tokens=30)
    assert cut == answer[: answer.index(stop)]
    pieces = list(stopped.stream("Describe the image.", images=images[:1], max_new_tokens=30))
    assert "".join(pieces) == cut
    assert len(steps) < 30  # generation stopped at the stop string, not at max_new_tokens
    # In a batch the row that meets the stop string finishes; the others go on as they would alone.
    prompts, groups = ["Describe the image.", "Tell me a story."], [images[:1], []]
    batched = stopped.chat_batch(prompts, images=groups, max_new_tokens=30)
    assert batched[0] == cut
    assert batched[1] == stopped.chat(prompts[1], max_new_tokens=30)


def test_text_row_holds_back_a_possible_stop_string(pipe):
    tok = pipe.processor.tokenizer
    row = TextRow(pipe.processor, ["</s>", "STOP"], eos_ids=[2])
    out = []
    for token in tok.encode_text("Hello there STOP and more", add_special_tokens=False):
        row.push(token)
        out.append(row.take())
    assert row.done and "".join(out) == "Hello there "
    row = TextRow(pipe.processor, ["</s>"], eos_ids=[2])
    for token in tok.encode_text("a cat </", add_special_tokens=False):
        row.push(token)
    assert row.take() == "a cat "  # "</" could begin "</s>"
    row.finish()  # max tokens reached: what was held back is released
    assert row.take() == "</" and row.raw == "a cat </"
    row = TextRow(pipe.processor, ["</s>"], eos_ids=[2])
    for token in [*tok.encode_text("a dog", add_special_tokens=False), 2, 5, 6]:
        row.push(token)  # EOS ends the row; later (pad) tokens are ignored
    assert row.done and row.take() == "a dog"


def test_batch_chat_equals_each_prompt_alone(pipe, images):
    prompts = ["What is this?", "Say something long about nothing at all.", "Compare <image> with <image>."]
    groups = [images[:1], [], images]
    batched = pipe.chat_batch(prompts, images=groups, max_new_tokens=12)
    alone = [pipe.chat(p, images=g, max_new_tokens=12) for p, g in zip(prompts, groups, strict=True)]
    assert batched == alone


def test_second_turn_reuses_the_cache(pipe, images, monkeypatch):
    conv = pipe.conversation()
    first = conv.chat("What is in this image?", images=images[:1], max_new_tokens=16)
    assert first and conv.messages[-1] == {"role": "assistant", "content": first}
    assert conv.last_prefill > pipe.processor.num_image_tokens
    encoded = []
    encode = pipe.model.encode_images
    monkeypatch.setattr(pipe.model, "encode_images", lambda px, *sizes: encoded.append(len(px)) or encode(px, *sizes))
    second = conv.chat("And what color is it?", max_new_tokens=16)
    assert encoded == []  # the image is not encoded again
    first_prompt = len(pipe.processor.encode(pipe.template.format(conv.messages[:1])))
    n_new = len(pipe.processor.encode(pipe.template.format(conv.messages[:3])))
    # At most the answer (re-tokenized from its text) and the new turn ran; the first prompt came from the cache.
    assert conv.last_prefill <= n_new - first_prompt
    monkeypatch.undo()
    # The same conversation recomputed from scratch gives the same answer.
    fresh = pipe.conversation()
    fresh.messages = list(conv.messages[:2])
    fresh.pixels = list(conv.pixels)
    assert fresh.chat("And what color is it?", max_new_tokens=16) == second
    assert fresh.last_prefill == n_new


def test_other_generations_leave_a_conversation_cache_alone(pipe, images):
    conv = pipe.conversation()
    conv.chat("What is in this image?", images=images[:1], max_new_tokens=8)
    other = pipe.conversation()
    other.chat("Unrelated question.", max_new_tokens=4)
    pipe.chat("Another one.", max_new_tokens=4)
    answer = conv.chat("And then?", max_new_tokens=8)
    whole = len(pipe.processor.encode(pipe.template.format(conv.messages[:3])))
    assert conv.last_prefill < whole - pipe.processor.num_image_tokens  # the first turn still came from the cache
    fresh = pipe.conversation()
    fresh.messages, fresh.pixels = list(conv.messages[:2]), list(conv.pixels)
    assert fresh.chat("And then?", max_new_tokens=8) == answer


def test_an_interrupted_answer_is_kept(pipe, images):
    conv = pipe.conversation()
    pieces = conv.stream("What is in this image?", images=images[:1], max_new_tokens=30)
    got = [next(pieces), next(pieces), next(pieces)]
    pieces.close()  # what Ctrl-C in the CLI does
    assert conv.messages[-1]["content"] == "".join(got).strip()
    assert conv.cache.filled == len(conv._cached)
    # The next turn continues from the cut answer exactly as a conversation rebuilt from the messages does.
    fresh = pipe.conversation()
    fresh.messages, fresh.pixels = list(conv.messages), list(conv.pixels)
    assert conv.chat("Go on.", max_new_tokens=6) == fresh.chat("Go on.", max_new_tokens=6)


def test_chat_batch_takes_a_list_only(pipe):
    with pytest.raises(ValueError, match="chat_batch takes a list of prompts"):
        pipe.chat_batch("one prompt")


def test_pipeline_errors(pipe, images):
    with pytest.raises(ValueError, match="exceeds the context window of 512 tokens"):
        pipe.chat("hi", max_new_tokens=600)
    with pytest.raises(ValueError, match="temperature must be"):
        pipe.chat("hi", temperature=-1.0)
    with pytest.raises(ValueError, match=r"1 <image> marker\(s\) but 2 image"):
        pipe.chat("one <image> only", images=images)
    with pytest.raises(ValueError, match="no room for an answer"):
        pipe.chat("word " * 600)
