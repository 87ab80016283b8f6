"""Generation never answers silently wrong: non-finite logits or pixels raise a clear error instead of an empty
answer, and text the model wrote never comes back as an image marker in a later turn."""

from __future__ import annotations

import pytest
import torch

from minillava.generate import generate
from minillava.pipeline import Pipeline
from tests.tiny_models import EOS_ID


@pytest.fixture
def pipe(chat_checkpoint) -> Pipeline:
    return Pipeline(chat_checkpoint)  # a fresh model per test: the tests below edit its weights


def test_non_finite_weights_raise_instead_of_an_empty_answer(pipe):
    with torch.no_grad():
        pipe.model.llm.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinite logits at generated token 1 .*weights"):
        pipe.chat("What is it?", max_new_tokens=4)


def test_non_finite_pixels_are_refused(pipe, images):
    proc = pipe.processor
    batch = proc(proc.format_chat([{"role": "user", "content": "<image>\nWhat is it?"}]), images=[images[0]])
    batch["pixel_values"][0, 1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match=r"pixel_values hold 1 NaN or infinite value"):
        generate(pipe.model, **batch, max_new_tokens=4)


def make_parrot(pipe: Pipeline, answer: str) -> None:
    """Rewire the model so that, after the generation prompt, it greedily writes ``answer`` one character piece at
    a time and then EOS: each block adds nothing to the residual stream, each token's embedding is a unit vector
    of its own, and the lm_head maps each step's vector to the next piece."""
    tok = pipe.processor.tokenizer
    chain = [tok.token_to_id(ch) for ch in answer]
    assert None not in chain and len(set(chain)) == len(chain), chain
    prompt = pipe.processor.encode(pipe.template.format([{"role": "user", "content": "Hi"}]))
    llm = pipe.model.llm
    with torch.no_grad():
        for block in llm.layers:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        llm.norm.weight.fill_(1.0)
        llm.embed_tokens.weight.zero_()
        llm.lm_head.weight.zero_()
        for i, (current, following) in enumerate(zip([prompt[-1], *chain], [*chain, EOS_ID], strict=True)):
            llm.embed_tokens.weight[current, i] = 1.0
            llm.lm_head.weight[following, i] = 10.0


def test_a_generated_marker_never_comes_back_as_an_image(pipe):
    make_parrot(pipe, "<image>")
    conv = pipe.conversation()
    assert conv.chat("Hi") == "<image>"
    assert conv.messages[-1] == {"role": "assistant", "content": "<image>"}  # the history keeps what was said
    # Later turns read it as text: no image is asked for, and the answers go on.
    assert conv.chat("Hi") == "<image>"
    assert conv.chat("Hi") == "<image>"
