"""Chat templates: literal strings as original LLaVA's conversation.py builds them, and the errors."""

import jinja2
import pytest

from minillava.chat import TEMPLATES, ChatTemplate, default_template_for, format_chat, get_template

TWO_TURNS = [
    {"role": "user", "content": "<image>\nWhat is in the picture?"},
    {"role": "assistant", "content": "A cat on a mat."},
    {"role": "user", "content": "What color is it?"},
]

# What conversation.py (haotian-liu/LLaVA HEAD) returns for TWO_TURNS after append_message(roles[1], None).
# Written out by hand from its get_prompt; the system prompts are spelled in full on purpose.
EXPECTED = {
    "vicuna_v1": (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat is in the picture? "
        "ASSISTANT: A cat on a mat.</s>USER: What color is it? ASSISTANT:"
    ),
    "llava_v1": (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: <image>\nWhat is in the picture? "
        "ASSISTANT: A cat on a mat.</s>USER: What color is it? ASSISTANT:"
    ),
    "llava_llama_2": (
        "[INST] <<SYS>>\nYou are a helpful language and vision assistant. You are able to understand the visual "
        "content that the user provides, and assist the user with a variety of tasks using natural language.\n"
        "<</SYS>>\n\n<image>\nWhat is in the picture? [/INST] A cat on a mat. </s><s>[INST] What color is it? [/INST]"
    ),
    "mistral_instruct": (
        "[INST] <image>\nWhat is in the picture? [/INST] A cat on a mat. </s>[INST] What color is it? [/INST]"
    ),
    "chatml_direct": (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is in the picture?"
        "<|im_end|><|im_start|>assistant\nA cat on a mat.<|im_end|><|im_start|>user\nWhat color is it?<|im_end|>"
        "<|im_start|>assistant\n"
    ),
    # conversation.py's plain template has sep2=None and raises on a finished answer; minillava ends answers with
    # "\n" as LLaVA's pretraining data does.
    "plain": "<image>\nWhat is in the picture?\nA cat on a mat.\nWhat color is it?\n",
    "llava_hf": "USER: <image>\nWhat is in the picture? ASSISTANT: A cat on a mat. USER: What color is it? ASSISTANT:",
}


def test_every_template_has_a_literal_expectation():
    assert set(EXPECTED) == set(TEMPLATES)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_two_turns_with_generation_prompt(name):
    assert format_chat(TWO_TURNS, template=name) == EXPECTED[name]


def test_finished_conversation_for_training():
    messages = TWO_TURNS + [{"role": "assistant", "content": "Orange."}]
    assert format_chat(messages, "vicuna_v1", add_generation_prompt=False) == (EXPECTED["vicuna_v1"] + " Orange.</s>")
    assert format_chat(messages, "llava_llama_2", add_generation_prompt=False) == (
        EXPECTED["llava_llama_2"] + " Orange. </s>"
    )
    assert format_chat(messages, "chatml_direct", add_generation_prompt=False) == (
        EXPECTED["chatml_direct"] + "Orange.<|im_end|>"
    )
    assert format_chat(messages, "llava_hf", add_generation_prompt=False) == EXPECTED["llava_hf"] + " Orange. "
    # The llama_2 layout never writes a generation prompt: the flag changes nothing there.
    assert format_chat(TWO_TURNS, "mistral_instruct", add_generation_prompt=False) == EXPECTED["mistral_instruct"]


def test_default_template_is_llava_v1():
    assert format_chat(TWO_TURNS) == EXPECTED["llava_v1"]


def test_system_message_replaces_the_default():
    messages = [{"role": "system", "content": "Be brief."}, *TWO_TURNS]
    assert format_chat(messages, "vicuna_v1").startswith("Be brief. USER: <image>\n")
    assert format_chat(messages, "chatml_direct").startswith("<|im_start|>system\nBe brief.<|im_end|><|im_start|>user")
    assert format_chat(messages, "llava_llama_2").startswith("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<image>")
    assert format_chat(messages, "llava_hf").startswith("Be brief. USER: <image>")
    # An empty system prompt drops the <<SYS>> block, as conversation.py's wrap_sys does.
    no_sys = [{"role": "system", "content": ""}, *TWO_TURNS]
    assert format_chat(no_sys, "llava_llama_2") == EXPECTED["mistral_instruct"].replace("</s>", "</s><s>")


# The llava-hf hub chat template (llava-1.5-*-hf chat_template.json), less its {% generation %} markers, which
# only tag assistant text for masks and write nothing.
HUB_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_llava_hf_matches_the_hub_template(system):
    typed = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat on a mat."}]},
        {"role": "user", "content": [{"type": "text", "text": "What color is it?"}]},
    ]
    plain = list(TWO_TURNS)
    if system is not None:
        typed.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
        plain.insert(0, {"role": "system", "content": system})
    hub = jinja2.Template(HUB_TEMPLATE).render(messages=typed, add_generation_prompt=True)
    assert format_chat(plain, "llava_hf") == hub


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_segments_join_to_the_prompt_and_mark_answers(name):
    messages = TWO_TURNS + [{"role": "assistant", "content": "Orange."}]
    template = get_template(name)
    segments = template.segments(messages, add_generation_prompt=False)
    assert "".join(text for text, _ in segments) == template.format(messages, add_generation_prompt=False)
    answers = [text for text, is_answer in segments if is_answer]
    assert len(answers) == 2
    assert "A cat on a mat." in answers[0] and "Orange." in answers[1]
    # Each answer carries the separator that ends it (what training supervises).
    ends = {"two": "</s>", "llama_2": " </s>", "mpt": "<|im_end|>", "plain": "\n", "llava_hf": " "}
    assert all(text.endswith(ends[template.layout]) for text in answers)


def test_templates_are_data():
    vicuna = TEMPLATES["vicuna_v1"]
    assert isinstance(vicuna, ChatTemplate)
    assert (vicuna.roles, vicuna.sep, vicuna.sep2, vicuna.stop_strings) == (
        ("USER", "ASSISTANT"),
        " ",
        "</s>",
        ("</s>",),
    )
    assert TEMPLATES["chatml_direct"].stop_strings == ("<|im_end|>",)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("liuhaotian/llava-v1.5-7b", "llava_v1"),
        ("/models/llava-v1.5-13b/", "llava_v1"),
        ("liuhaotian/llava-v1.6-34b", "chatml_direct"),
        ("liuhaotian/llava-v1.6-mistral-7b", "mistral_instruct"),
        ("liuhaotian/llava-llama-2-13b-chat-lightning-preview", "llava_llama_2"),
        ("runs/llava-v1.5-7b-lora/checkpoint-500", "llava_v1"),
        ("some-other-model", "llava_v1"),
    ],
)
def test_default_template_follows_the_cli_rule(name, expected):
    assert default_template_for(name) == expected


def test_default_template_for_llava_1_6():
    """llava-hf's 1.6 conversions take the name rule too (their prompts are the original's); a Mistral decoder whose
    directory name says nothing gets mistral_instruct."""
    assert default_template_for("llava-hf/llava-v1.6-mistral-7b-hf", "original", "mistral") == "mistral_instruct"
    assert default_template_for("llava-hf/llava-v1.6-vicuna-13b-hf", "original", "llama") == "llava_v1"
    assert default_template_for("llava-hf/llava-v1.6-34b-hf", "original", "llama") == "chatml_direct"
    assert default_template_for("my-finetune", "original", "mistral") == "mistral_instruct"
    assert default_template_for("my-finetune", "original", "llama") == "llava_v1"


def test_default_template_for_llava_hf_layouts():
    for layout in ("hf_llava", "llava_hf", "llava-hf", "hf"):
        assert default_template_for("llava-hf/llava-1.5-7b-hf", layout) == "llava_hf"
    assert default_template_for("liuhaotian/llava-v1.5-7b", "original_llava") == "llava_v1"


def test_unknown_template_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown chat template 'vicuna'.*vicuna_v1.*llava_hf"):
        format_chat(TWO_TURNS, template="vicuna")


@pytest.mark.parametrize(
    ("messages", "kwargs", "match"),
    [
        ([], {}, "empty prompt"),
        ([{"role": "system", "content": "Hi."}], {}, "empty prompt"),
        ([{"role": "user", "content": "   "}], {}, "message 0 \\(user\\) is empty"),
        ([{"role": "user", "content": ["<image>", "hi"]}], {}, "content must be a str, got list"),
        ([{"role": "user", "content": None}], {}, "content must be a str, got NoneType"),
        ([{"role": "assistant", "content": "Hello."}], {}, "message 0: expected a user message, got assistant"),
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            {},
            "message 1: expected an assistant message, got user",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
            {},
            "a system message may only come first",
        ),
        ([{"role": "robot", "content": "a"}], {}, "unknown role 'robot'"),
        ([{"content": "a"}], {}, 'must be a dict with "role" and "content"'),
        ("What is this?", {}, "messages must be a list"),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            {"add_generation_prompt": True},
            "ends with an assistant message",
        ),
    ],
)
def test_message_errors(messages, kwargs, match):
    with pytest.raises(ValueError, match=match):
        format_chat(messages, "vicuna_v1", **kwargs)
