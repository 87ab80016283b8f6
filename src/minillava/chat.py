"""Conversation templates: messages in, the exact prompt string the checkpoint was trained on out.

Each template is plain data (system prompt, role names, separators, stop strings) plus one of five layouts. The
strings are byte-identical to what original LLaVA's ``conversation.py`` builds from the same turns with
``append_message(roles[1], None)`` as the generation prompt, and ``llava_hf`` is the llava-hf hub chat template.

Message content is used verbatim: ``<image>`` stays where the user wrote it (original LLaVA's CLI writes
``"<image>\\n" + question`` for the first turn; do the same for the prompts it was trained on).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAVA_LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)

LAYOUTS = ("two", "llama_2", "mpt", "plain", "llava_hf")


@dataclass(frozen=True)
class ChatTemplate:
    """One conversation format, as data.

    Attributes:
        name: registry key.
        layout: how turns are joined (original LLaVA's ``SeparatorStyle``: ``two``, ``llama_2``, ``mpt``, ``plain``;
            and ``llava_hf`` for the hub template).
        system: the default system prompt (a ``system`` message replaces it).
        roles: the (user, assistant) role strings as they appear in the prompt.
        sep: separator after the system prompt and user turns (``two``), after every turn (``mpt``, ``plain``),
            or the string stripped from the start (``llama_2``).
        sep2: separator after assistant turns (``two``, ``llama_2``, ``plain``).
        system_format: how the system prompt text is written (``chatml_direct`` wraps it in ``<|im_start|>system``).
        stop_strings: strings that end an assistant turn: generation stops on them, training supervises them.
    """

    name: str
    layout: str
    system: str
    roles: tuple[str, str]
    sep: str
    sep2: str | None
    stop_strings: tuple[str, ...]
    system_format: str = "{}"

    def segments(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> list[tuple[str, bool]]:
        """The prompt as ``(text, is_answer)`` pieces; joined they are :func:`format_chat`'s string.

        ``is_answer`` marks an assistant turn's content with the separator that ends it (what training
        supervises); everything else (system prompt, roles, user turns, the generation prompt) is ``False``.
        """
        given_system, turns = _validate(messages, add_generation_prompt)
        if self.layout == "llava_hf":
            return _render_llava_hf(given_system, turns, add_generation_prompt)
        system = self.system if given_system is None else given_system
        system_text = self.system_format.format(system) if system else ""
        user, assistant = self.roles
        out: list[tuple[str, bool]] = []
        if self.layout == "two":
            out.append((system_text + self.sep, False))
            for i, text in enumerate(turns):
                if i % 2 == 0:
                    out.append((user + ": " + text + self.sep, False))
                else:
                    out += [(assistant + ": ", False), (text + self.sep2, True)]
            if add_generation_prompt:
                out.append((assistant + ":", False))
        elif self.layout == "mpt":
            out.append((system_text + self.sep, False))
            for i, text in enumerate(turns):
                if i % 2 == 0:
                    out.append((user + text + self.sep, False))
                else:
                    out += [(assistant, False), (text + self.sep, True)]
            if add_generation_prompt:
                out.append((assistant, False))
        elif self.layout == "plain":
            out.append((system_text, False))
            for i, text in enumerate(turns):
                out.append((text + self.sep, False) if i % 2 == 0 else (text + self.sep2, True))
        elif self.layout == "llama_2":
            for i, text in enumerate(turns):
                if i == 0 and system:
                    text = f"<<SYS>>\n{system}\n<</SYS>>\n\n" + text
                if i % 2 == 0:
                    out.append((self.sep + f"[INST] {text} [/INST]", False))
                else:
                    out.append((" " + text + " " + self.sep2, True))
            # conversation.py ends with ret.lstrip(sep): a character-set strip, kept as is.
            out[0] = (out[0][0].lstrip(self.sep), out[0][1])
        else:
            raise ValueError(f"unknown layout {self.layout!r}; known: {', '.join(LAYOUTS)}")
        return [seg for seg in out if seg[0]]

    def format(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt string for ``messages``."""
        return "".join(text for text, _ in self.segments(messages, add_generation_prompt))


def _render_llava_hf(system: str | None, turns: list[str], add_generation_prompt: bool) -> list[tuple[str, bool]]:
    # The llava-hf template: "ROLE: " (nothing for system), then each text part followed by one space.
    out: list[tuple[str, bool]] = []
    if system is not None:
        out.append((system + " ", False))
    for i, text in enumerate(turns):
        if i % 2 == 0:
            out.append(("USER: " + text + " ", False))
        else:
            out += [("ASSISTANT: ", False), (text + " ", True)]
    if add_generation_prompt:
        out.append(("ASSISTANT:", False))
    return out


TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        ChatTemplate("vicuna_v1", "two", VICUNA_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>", ("</s>",)),
        ChatTemplate("llava_v1", "two", LLAVA_V1_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>", ("</s>",)),
        ChatTemplate("llava_llama_2", "llama_2", LLAVA_LLAMA_2_SYSTEM, ("USER", "ASSISTANT"), "<s>", "</s>", ("</s>",)),
        ChatTemplate("mistral_instruct", "llama_2", "", ("USER", "ASSISTANT"), "", "</s>", ("</s>",)),
        ChatTemplate(
            "chatml_direct",
            "mpt",
            "Answer the questions.",
            ("<|im_start|>user\n", "<|im_start|>assistant\n"),
            "<|im_end|>",
            None,
            ("<|im_end|>",),
            system_format="<|im_start|>system\n{}",
        ),
        # Original LLaVA's plain template has sep2=None and cannot render a finished answer; its pretraining data
        # ends each caption with "\n" (preprocess_plain), which is what sep2 says here.
        ChatTemplate("plain", "plain", "", ("", ""), "\n", "\n", ("\n",)),
        ChatTemplate("llava_hf", "llava_hf", "", ("USER", "ASSISTANT"), " ", " ", ("</s>",)),
    )
}

DEFAULT_TEMPLATE = "llava_v1"
"""What original LLaVA's CLI picks for llava-v1.5 checkpoints; ``format_chat`` uses it when given no template."""


def get_template(template: str | ChatTemplate | None) -> ChatTemplate:
    """Look a template up by name (``None``: :data:`DEFAULT_TEMPLATE`)."""
    if isinstance(template, ChatTemplate):
        return template
    if template is None:
        template = DEFAULT_TEMPLATE
    if not isinstance(template, str) or template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; known templates: {', '.join(TEMPLATES)}")
    return TEMPLATES[template]


def format_chat(
    messages: Sequence[Mapping[str, str]],
    template: str | ChatTemplate | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """Render ``messages`` with a chat template.

    Args:
        messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``: an optional system message
            first (it replaces the template's system prompt), then user and assistant turns alternating, starting
            with the user. ``<image>`` in a user message marks where an image goes.
        template: a name from :data:`TEMPLATES`, a :class:`ChatTemplate`, or ``None`` for :data:`DEFAULT_TEMPLATE`
            (a :class:`~minillava.processor.Processor`'s ``format_chat`` uses the checkpoint's default instead).
        add_generation_prompt: end with the assistant role, ready for generation (the conversation must then end
            with a user turn); ``False`` renders finished turns only, e.g. for training.

    Returns:
        The prompt string, byte-identical to original LLaVA's ``conversation.py`` (or the llava-hf hub template).
    """
    return get_template(template).format(messages, add_generation_prompt)


def _validate(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> tuple[str | None, list[str]]:
    """Check roles and contents; return (system prompt or None, [user, assistant, user, ...] contents)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError('messages must be a list of {"role": ..., "content": ...} dicts')
    system: str | None = None
    turns: list[str] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f'message {i} must be a dict with "role" and "content", got {message!r}')
        role, content = message["role"], message["content"]
        if not isinstance(content, str):
            raise ValueError(
                f"message {i} ({role}): content must be a str, got {type(content).__name__}; "
                "write images as <image> inside the text and pass them to the processor"
            )
        if role == "system":
            if i != 0:
                raise ValueError(f"message {i}: a system message may only come first")
            system = content
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role not in ("user", "assistant"):
            raise ValueError(f"message {i}: unknown role {role!r}; roles are system, user, assistant")
        if role != expected:
            raise ValueError(
                f"message {i}: expected {'a user' if expected == 'user' else 'an assistant'} message, got {role}; "
                "after an optional system message, "
                "turns alternate user, assistant, user, ..."
            )
        if not content.strip():
            raise ValueError(f"message {i} ({role}) is empty")
        turns.append(content)
    if not turns:
        raise ValueError("empty prompt: the conversation has no user message")
    if add_generation_prompt and len(turns) % 2 == 0:
        raise ValueError(
            "the conversation ends with an assistant message; add a user message or pass add_generation_prompt=False"
        )
    return system, turns


def model_name_from_path(name_or_path: str | os.PathLike) -> str:
    """Original LLaVA's ``get_model_name_from_path``: the last path part (``checkpoint-N`` gets its parent's name)."""
    parts = Path(str(name_or_path).rstrip("/\\")).parts
    if not parts:
        return ""
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return parts[-2] + "_" + parts[-1]
    return parts[-1]


def default_template_for(
    name_or_path: str | os.PathLike, layout: str | None = None, text_model_type: str | None = None
) -> str:
    """The template a checkpoint was trained with, by original LLaVA's CLI rule.

    ``layout`` is the source layout of the weights: llava-hf checkpoints (any layout name containing ``hf``) use
    ``llava_hf``. Otherwise the model name decides, as in LLaVA's ``cli.py``: ``llama-2`` → ``llava_llama_2``,
    ``mistral`` → ``mistral_instruct``, ``v1.6-34b`` → ``chatml_direct``, ``v1`` → ``llava_v1``. Names matching
    none of these fall back to ``mistral_instruct`` when ``text_model_type`` is ``mistral`` (a renamed
    llava-v1.6-mistral), else to ``llava_v1`` (the CLI's own fallback, ``llava_v0``, is a LLaVA-1.0 template that
    minillava does not ship).
    """
    if layout is not None and "hf" in layout.lower().replace("-", "_").split("_"):
        return "llava_hf"
    name = model_name_from_path(name_or_path).lower()
    if "llama-2" in name:
        return "llava_llama_2"
    if "mistral" in name or ("v1" not in name and text_model_type == "mistral"):
        return "mistral_instruct"
    if "v1.6-34b" in name:
        return "chatml_direct"
    return "llava_v1"
