"""A minillava chat template written as the Jinja ``chat_template.jinja`` that transformers renders.

``processor.apply_chat_template(messages)`` then builds, from the same turns, the string
:func:`minillava.chat.format_chat` builds: each template's system prompt, roles and separators (see
:class:`~minillava.chat.ChatTemplate`). Message content is a string, or a list of parts as transformers writes
them (``{"type": "image"}`` becomes ``<image>\\n``, ``{"type": "text", "text": ...}`` its text, in order), so a
one-image question renders as minillava's pipeline writes it: ``<image>\\n`` before the text.

``image_suffix`` is written after every ``<image>``. minillava (and original LLaVA) encode the text after an image
on its own, so it starts with sentencepiece's dummy-prefix ``▁``; transformers encodes the whole string, and a
non-legacy tokenizer gives no ``▁`` after a special token. A space there makes the two sets of ids equal
(:func:`image_suffix_for` finds out which one a tokenizer needs).
"""

from __future__ import annotations

import json

from minillava.chat import ChatTemplate
from minillava.layouts.reading import ConversionError
from minillava.tokenizer import IMAGE_MARKER

# The message's text in ns.text: a string (its <image> markers get the suffix), or parts in order.
_CONTENT = """\
{%- if message['content'] is string -%}
{%- set ns.text = message['content'] | replace(IMAGE, IMAGE + SUFFIX) -%}
{%- else -%}
{%- set ns.text = '' -%}
{%- for part in message['content'] -%}
{%- if part['type'] == 'image' -%}
{%- set ns.text = ns.text + IMAGE + SUFFIX + '\\n' -%}
{%- elif part['type'] == 'text' -%}
{%- set ns.text = ns.text + (part['text'] | replace(IMAGE, IMAGE + SUFFIX)) -%}
{%- endif -%}
{%- endfor -%}
{%- endif -%}"""

# A system message may only come first; it replaces the template's system prompt.
_HEAD = (
    """\
{%- set ns = namespace(text='', system=SYSTEM, given=false, turn=0) -%}
{%- for message in messages -%}
{%- if message['role'] == 'system' -%}
{%- if not loop.first -%}{{ raise_exception('a system message may only come first') }}{%- endif -%}
"""
    + _CONTENT
    + """
{%- set ns.system = ns.text -%}
{%- set ns.given = true -%}
{%- endif -%}
{%- endfor -%}
{%- if ns.system -%}{%- set system_text = SYSTEM_PREFIX + ns.system + SYSTEM_SUFFIX -%}{%- else -%}\
{%- set system_text = '' -%}{%- endif -%}
"""
)

# Per layout: what opens the prompt, each user and assistant turn (ns.text holds its content), and the generation
# prompt. These mirror ChatTemplate.segments.
_LAYOUTS = {
    "two": (
        "{{- system_text + SEP -}}",
        "{{- ROLE_USER + ': ' + ns.text + SEP -}}",
        "{{- ROLE_ASSISTANT + ': ' + ns.text + SEP2 -}}",
        "{{- ROLE_ASSISTANT + ':' -}}",
    ),
    "mpt": (
        "{{- system_text + SEP -}}",
        "{{- ROLE_USER + ns.text + SEP -}}",
        "{{- ROLE_ASSISTANT + ns.text + SEP -}}",
        "{{- ROLE_ASSISTANT -}}",
    ),
    "plain": ("{{- system_text -}}", "{{- ns.text + SEP -}}", "{{- ns.text + SEP2 -}}", ""),
    # original LLaVA strips the separator off the start of the prompt, so the first turn has none.
    "llama_2": (
        "",
        "{%- if ns.turn > 0 -%}{{- SEP -}}{%- endif -%}"
        "{%- if ns.turn == 0 and ns.system -%}"
        "{%- set ns.text = '<<SYS>>\\n' + ns.system + '\\n<</SYS>>\\n\\n' + ns.text -%}{%- endif -%}"
        "{{- '[INST] ' + ns.text + ' [/INST]' -}}",
        "{{- ' ' + ns.text + ' ' + SEP2 -}}",
        "",
    ),
    "llava_hf": (
        "{%- if ns.given -%}{{- ns.system + ' ' -}}{%- endif -%}",
        "{{- 'USER: ' + ns.text + ' ' -}}",
        "{{- 'ASSISTANT: ' + ns.text + ' ' -}}",
        "{{- 'ASSISTANT:' -}}",
    ),
}

_BODY = (
    """\
{%- for message in messages -%}
{%- if message['role'] != 'system' -%}
"""
    + _CONTENT
    + """
{%- if message['role'] == 'user' -%}
USER_TURN
{%- elif message['role'] == 'assistant' -%}
ASSISTANT_TURN
{%- else -%}
{{- raise_exception('unknown role ' + message['role'] + '; roles are system, user, assistant') -}}
{%- endif -%}
{%- set ns.turn = ns.turn + 1 -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}GENERATION{%- endif -%}
"""
)


def jinja_chat_template(template: ChatTemplate, image_suffix: str = "") -> str:
    """The Jinja source of ``template`` for transformers' ``apply_chat_template``."""
    if template.layout not in _LAYOUTS:
        raise ConversionError(
            f"chat template {template.name!r} (layout {template.layout!r}) has no transformers form yet; known "
            f"layouts: {', '.join(_LAYOUTS)}"
        )
    opening, user, assistant, generation = _LAYOUTS[template.layout]
    prefix, _, suffix = template.system_format.partition("{}")
    constants = {
        "IMAGE": IMAGE_MARKER,
        "SUFFIX": image_suffix,
        "SYSTEM": template.system,
        "SYSTEM_PREFIX": prefix,
        "SYSTEM_SUFFIX": suffix,
        "SEP": template.sep,
        "SEP2": template.sep2 or "",
        "ROLE_USER": template.roles[0],
        "ROLE_ASSISTANT": template.roles[1],
    }
    source = _HEAD + opening + "\n" + _BODY
    source = source.replace("USER_TURN", user).replace("ASSISTANT_TURN", assistant).replace("GENERATION", generation)
    lines = [f"{{#- minillava chat template {template.name!r} (layout {template.layout}) -#}}"]
    lines += [f"{{%- set {name} = {json.dumps(value)} -%}}" for name, value in constants.items()]
    return "\n".join(lines) + "\n" + source


def image_suffix_for(tokenizer) -> str | None:
    """What to write after ``<image>`` so that a whole-string encoding gives the ids of LLaVA's chunk rule.

    ``tokenizer`` is a :class:`minillava.tokenizer.Tokenizer`; its ``encode_text`` encodes a whole string as
    transformers does. Returns ``""`` (the tokenizer already starts the text after a special token with ``▁``, as
    legacy LLaMA tokenizers do), ``" "`` (non-legacy ones), or ``None`` when neither gives equal ids.
    """
    image_id = tokenizer.token_to_id(IMAGE_MARKER)
    before, after = "USER: ", "\n"  # what the templates put around an image
    chunks = [image_id, *tokenizer.encode_text(after, add_special_tokens=False)]
    want = tokenizer.encode_text(before, add_special_tokens=False) + chunks
    for suffix in ("", " "):
        if tokenizer.encode_text(before + IMAGE_MARKER + suffix + after, add_special_tokens=False) == want:
            return suffix
    return None
