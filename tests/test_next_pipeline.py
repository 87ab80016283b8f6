"""Chat, batches, multi-turn conversations and the command line on a LLaVA-1.6 checkpoint: images of different sizes
expand to different placeholder counts, and every path gives what the same prompt gives alone."""

from __future__ import annotations

import json

import pytest
import torch

from minillava import cli
from minillava.pipeline import Pipeline
from tests.next_reference import make_next_checkpoint, random_image


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("next-pipeline")
    model = make_next_checkpoint(root / "model", seed=3)
    paths = []
    for i, size in enumerate([(30, 50), (90, 90), (20, 20)]):
        paths.append(root / f"{i}.png")
        random_image(*size, seed=i).save(paths[-1])
    return Pipeline(model), model, [str(p) for p in paths]


def test_batch_rows_equal_each_prompt_alone(setup):
    pipe, _, images = setup
    prompts = ["What is it?", "Compare them.", "Say hi."]
    groups = [[images[0]], [images[1], images[2]], []]
    batch = pipe.chat_batch(prompts, groups, max_new_tokens=8)
    alone = [pipe.chat(p, images=g, max_new_tokens=8) for p, g in zip(prompts, groups, strict=True)]
    assert batch == alone and any(batch)


def test_a_conversation_reuses_its_cache_across_images(setup, monkeypatch):
    pipe, _, images = setup
    conv = pipe.conversation()
    conv.chat("What is in this image?", images=[images[0]], max_new_tokens=6)
    encoded = []
    encode = pipe.model.encode_images
    monkeypatch.setattr(pipe.model, "encode_images", lambda px, *sizes: encoded.append(len(px)) or encode(px, *sizes))
    second = conv.chat("And in this one?", images=[images[1]], max_new_tokens=6)
    assert encoded == [1, 5]  # the new image (then its 5 tiles); the first one's rows came from the cache
    first_image = pipe.processor.image_tokens(30, 50)
    assert conv.last_prefill < len(pipe.processor.encode(pipe.template.format(conv.messages[:3]), [first_image, 88]))
    monkeypatch.undo()
    fresh = pipe.conversation()
    fresh.messages, fresh.pixels, fresh.image_sizes = list(conv.messages[:2]), conv.pixels[:1], conv.image_sizes[:1]
    assert fresh.chat("And in this one?", images=[images[1]], max_new_tokens=6) == second


def test_cli_generate_and_info(setup, capsys):
    pipe, model, images = setup
    assert (
        cli.main(["generate", "--model", str(model), "--image", images[1], "--prompt", "Hi", "--max-new-tokens", "5"])
        == 0
    )
    out, _ = capsys.readouterr()
    assert out == pipe.chat("Hi", images=[images[1]], max_new_tokens=5) + "\n"
    assert cli.main(["info", "--model", str(model), "--json"]) == 0
    info = json.loads(capsys.readouterr()[0])
    assert info["anyres"]["grid_pinpoints"][0] == [28, 56] and info["template"] == "mistral_instruct"
    assert cli.main(["info", "--model", str(model)]) == 0
    assert "canvases (height x width) 28x56, 56x28" in capsys.readouterr()[0]


def test_errors_name_the_numbers(setup):
    pipe, _, _ = setup
    batch = pipe.processor("[INST] <image>\nHi [/INST]", images=[random_image(30, 50)])
    from minillava.generate import generate

    ids = batch["input_ids"]
    first = int((ids[0] == pipe.processor.image_token_id).nonzero()[0])
    short = torch.cat([ids[:, :first], ids[:, first + 3 :]], dim=1)  # three placeholders fewer
    with pytest.raises(ValueError, match=r"49 image placeholders .* give 52 feature rows \(52 in order\)"):
        generate(pipe.model, short, batch["pixel_values"], image_sizes=batch["image_sizes"])
    with pytest.raises(ValueError, match=r"pixel_values must be \[N, tiles, 3, 28, 28\]"):
        generate(pipe.model, batch["input_ids"], batch["pixel_values"][0], image_sizes=batch["image_sizes"])
    wrong = batch["image_sizes"].flip(-1)  # (width, height): another grid, another count
    with pytest.raises(ValueError, match="image placeholders"):
        generate(pipe.model, batch["input_ids"], batch["pixel_values"], image_sizes=wrong, max_new_tokens=2)
    assert torch.equal(batch["image_sizes"], torch.tensor([[30, 50]]))
    with pytest.raises(ValueError, match=r"positive \(height, width\), got \(30, 0\)"):
        generate(pipe.model, batch["input_ids"], batch["pixel_values"], image_sizes=torch.tensor([[30, 0]]))
