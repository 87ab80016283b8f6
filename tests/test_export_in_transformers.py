"""An export runs in transformers as it is: its processor, chat template and ``generate`` (and the
``image-text-to-text`` pipeline) give minillava's prompts, ids and greedy answers, with no extra arguments."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import minillava
from minillava.chat import TEMPLATES, format_chat
from minillava.checkpoint import carried_files
from minillava.config import BUNDLED_MODEL
from minillava.processor import load_processor
from minillava.shapes.data import IMAGE_SIZE, iter_questions
from minillava.tokenizer import Tokenizer
from tests.sp_fixtures import write_tokenizer_dir
from tests.tiny_models import make_checkpoint, write_image
from weights_convert.__main__ import main as convert_main
from weights_convert.hf_chat_template import image_suffix_for, jinja_chat_template

HELD_OUT_IMAGES = 3  # up to 6 questions each (five types and a description; 'bigger' needs two shapes)

# Transformers' message form: content is a string or a list of parts.
CONVERSATIONS = {
    "one image": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
    "system, two turns, marker in text": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red cat."}]},
        {"role": "user", "content": "And in <image> this one?"},
    ],
    "text only, three turns": [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "Again, with 12 cats."},
    ],
}


def as_minillava(messages: list[dict]) -> list[dict]:
    """The same messages as minillava takes them: an image part is ``<image>\\n``, text parts their text."""
    out = []
    for m in messages:
        content = m["content"]
        if not isinstance(content, str):
            content = "".join("<image>\n" if p["type"] == "image" else p["text"] for p in content)
        out.append({"role": m["role"], "content": content})
    return out


def n_images(messages: list[dict]) -> int:
    return sum(
        m["content"].count("<image>")
        if isinstance(m["content"], str)
        else sum(p["type"] == "image" for p in m["content"])
        for m in messages
    )


@pytest.fixture(scope="module")
def bundled_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundled") / "shapes-hf"
    assert convert_main(["--to", "hf", str(BUNDLED_MODEL), str(out)]) == 0
    return out


def test_generation_config_is_complete_and_valid(bundled_export):
    from transformers import GenerationConfig

    data = json.loads((bundled_export / "generation_config.json").read_text())
    assert data == {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "max_new_tokens": 40,
        "do_sample": False,
        "suppress_tokens": [3],  # the image placeholder, which minillava never generates
    }
    GenerationConfig.from_pretrained(bundled_export).validate(strict=True)


def test_sampling_checkpoint_exports_sampling_settings(tmp_path):
    src = tmp_path / "sampling"
    shutil.copytree(BUNDLED_MODEL, src)
    config = json.loads((src / "config.json").read_text())
    config["generation"] = {"temperature": 0.7, "top_p": 0.9, "seed": 3, "stop_strings": ["."]}
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "hf"
    assert convert_main(["--to", "hf", str(src), str(out)]) == 0
    data = json.loads((out / "generation_config.json").read_text())
    # minillava samples from every token unless top_k is set; transformers' own default would be top_k=50.
    assert data["do_sample"] is True and data["temperature"] == 0.7 and data["top_p"] == 0.9 and data["top_k"] == 0
    assert "seed" not in data and "stop_strings" not in data


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_chat_template_renders_the_minillava_prompt(bundled_export, name):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(bundled_export)
    jinja = jinja_chat_template(TEMPLATES[name])
    for label, messages in CONVERSATIONS.items():
        # An open conversation (ready for the answer) and a finished one (as training renders it).
        cases = [(messages + [{"role": "assistant", "content": "Done."}], False)]
        if TEMPLATES[name].layout != "plain":  # plain has no generation prompt: it renders captions only
            cases.append((messages, True))
        for conversation, add_generation_prompt in cases:
            want = format_chat(as_minillava(conversation), name, add_generation_prompt=add_generation_prompt)
            got = processor.apply_chat_template(
                conversation, chat_template=jinja, add_generation_prompt=add_generation_prompt, tokenize=False
            )
            assert got == want, (label, add_generation_prompt)


@pytest.fixture(scope="module", params=["non-legacy", "legacy", "legacy-missing", "bundled"])
def exported_tokenizer(request, tmp_path_factory):
    """(minillava checkpoint, its llava-hf export) for one tokenizer flavour."""
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "bundled":  # <image> is a sentencepiece piece of its own, not an added token
        src = BUNDLED_MODEL
    else:
        src = make_checkpoint(root / "model", seed=2)
        legacy = {"non-legacy": False, "legacy": True, "legacy-missing": None}[request.param]
        tok = write_tokenizer_dir(root / "tok", legacy=legacy)
        for path in carried_files(tok):
            shutil.copy2(path, src / path.name)
    out = root / "hf"
    assert convert_main(["--to", "hf", str(src), str(out)]) == 0
    return src, out


def test_transformers_ids_equal_minillava_ids(exported_tokenizer, images):
    """For every template: transformers' processor on its chat template's string gives minillava's ids."""
    from transformers import AutoProcessor

    src, out = exported_tokenizer
    theirs = AutoProcessor.from_pretrained(out)
    ours = load_processor(src)
    suffix = image_suffix_for(ours.tokenizer)
    legacy = json.loads((src / "tokenizer_config.json").read_text()).get("legacy", True)
    assert suffix == ("" if legacy else " ")  # a non-legacy tokenizer gives no "▁" after a special token
    for name, template in TEMPLATES.items():
        jinja = jinja_chat_template(template, suffix)
        for label, messages in CONVERSATIONS.items():
            if template.layout == "plain":  # a caption after its image: no system prompt, no generation prompt
                first = next(m for m in messages if m["role"] == "user")
                messages = [first, {"role": "assistant", "content": "A caption."}]
            pictures = [str(images[i % 2]) for i in range(n_images(messages))]
            text = theirs.apply_chat_template(
                messages, chat_template=jinja, add_generation_prompt=template.layout != "plain"
            )
            got = theirs(text=text, images=pictures or None, return_tensors="pt")["input_ids"]
            prompt = ours.format_chat(as_minillava(messages), name, add_generation_prompt=template.layout != "plain")
            want = ours(prompt, images=pictures)["input_ids"]
            assert got.tolist() == want.tolist(), (name, label)


def test_bundled_answers_through_transformers_generate(bundled_export):
    """transformers' processor, chat template and generate answer held-out shapes questions as minillava does."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(bundled_export)
    model = LlavaForConditionalGeneration.from_pretrained(bundled_export).eval()
    pipe = minillava.Pipeline()
    questions = list(iter_questions(HELD_OUT_IMAGES, 0, "heldout", IMAGE_SIZE))
    assert len(questions) >= 5 * HELD_OUT_IMAGES
    for q in questions:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q.question}]}]
        inputs = processor(
            text=processor.apply_chat_template(messages, add_generation_prompt=True),
            images=[q.image],
            return_tensors="pt",
        )
        with torch.no_grad():
            out = model.generate(**inputs)
        theirs = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert theirs == pipe.chat(q.question, images=[q.image]), q.question


def test_bundled_answers_through_the_transformers_pipeline(bundled_export):
    from transformers import pipeline

    hf = pipeline("image-text-to-text", model=str(bundled_export))
    pipe = minillava.Pipeline()
    for q in list(iter_questions(1, 0, "heldout", IMAGE_SIZE))[:3]:
        messages = [
            {"role": "user", "content": [{"type": "image", "image": q.image}, {"type": "text", "text": q.question}]}
        ]
        reply = hf(text=messages)[0]["generated_text"][-1]
        assert reply["role"] == "assistant"
        # The pipeline cuts the decoded prompt off the decoded whole, which keeps the answer's leading space.
        assert reply["content"].removeprefix(" ") == pipe.chat(q.question, images=[q.image]), q.question


def test_suppressed_placeholder_keeps_answers_equal(tmp_path, images):
    """minillava never generates the image placeholder (its logit is masked); the export's ``suppress_tokens``
    makes transformers do the same. Here the placeholder's head row is made to beat EOS at the end of answers."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = minillava.load(BUNDLED_MODEL)
    with torch.no_grad():
        model.llm.lm_head.weight[model.config.image_token_id] = 4 * model.llm.lm_head.weight[2]
    src, out = tmp_path / "boosted", tmp_path / "boosted-hf"
    minillava.save(model, src, extra_files=carried_files(BUNDLED_MODEL))
    assert convert_main(["--to", "hf", str(src), str(out)]) == 0
    processor = AutoProcessor.from_pretrained(out)
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    pipe = minillava.Pipeline(src)
    image = str(write_image(tmp_path / "red.png", (220, 30, 30), (72, 72)))
    for q in ("What color is the shape?", "Describe the image briefly."):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
        inputs = processor(
            text=processor.apply_chat_template(messages, add_generation_prompt=True),
            images=[image],
            return_tensors="pt",
        )
        with torch.no_grad():
            new = hf.generate(**inputs)[0, inputs["input_ids"].shape[1] :]
        assert model.config.image_token_id not in new.tolist()
        assert processor.decode(new, skip_special_tokens=True) == pipe.chat(q, images=[image])


def test_stale_chat_template_files_are_replaced(tmp_path):
    """A carried chat_template.json (which transformers prefers over the .jinja) would render another template."""
    src = tmp_path / "src"
    shutil.copytree(BUNDLED_MODEL, src)
    (src / "chat_template.json").write_text(json.dumps({"chat_template": "{{ 'stale' }}"}))
    out = tmp_path / "hf"
    assert convert_main(["--to", "hf", str(src), str(out)]) == 0
    assert not (out / "chat_template.json").exists()
    assert "vicuna_v1" in (out / "chat_template.jinja").read_text()
    assert Tokenizer.from_dir(out).token_to_id("<image>") == 3
