"""``--to hf``: a minillava checkpoint written back in the llava-hf layout loads in transformers with the same
logits, and minillava -> hf -> minillava (and hf -> minillava -> hf) round-trips every tensor bit for bit."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from torch.testing import assert_close

import minillava
from tests.hf_reference import (
    IMAGE_TOKEN_ID,
    ORIGINAL_PLACEHOLDER,
    batch_inputs,
    convert_hf,
    expand_sentinels,
    make_hf_model,
    make_original_model,
    save_clip_dir,
    save_hf,
    save_original,
    sentinel_batch,
)
from weights_convert.__main__ import main as convert_main

FP32 = {"rtol": 1e-5, "atol": 1e-5}
OPTIONS = {
    "base": {},
    "tied": {"tie_word_embeddings": True},
    "rope-linear+full+bias-free": {
        "rope": {"rope_type": "linear", "factor": 2.0},
        "strategy": "full",
        "projector_bias": False,
    },
}


def tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def load_hf(directory):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(directory).eval()


@pytest.fixture(scope="module", params=list(OPTIONS), ids=list(OPTIONS))
def exported(request, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp(request.param)
    hf = make_hf_model(seed=5, **OPTIONS[request.param])
    ours, converted = convert_hf(hf, tmp_path, layout="v4", config_form="v4")
    out = tmp_path / "exported"
    assert convert_main(["--to", "hf", str(converted), str(out), "--max-shard-size", "60KB"]) == 0
    return hf, ours, converted, out, tmp_path


def test_transformers_loads_export_with_same_logits(exported):
    hf, _, _, out, _ = exported
    reloaded = load_hf(out)
    inputs = batch_inputs(reloaded.config.image_seq_length, seed=8)
    with torch.no_grad():
        expected = hf(**inputs).logits
        got = reloaded(**inputs).logits
    assert expected.std() > 1.0
    assert_close(got, expected, **FP32)


def test_export_has_hub_names_and_processor_files(exported):
    hf, ours, _, out, _ = exported
    index = json.loads((out / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    assert "language_model.model.embed_tokens.weight" in names
    assert "multi_modal_projector.linear_1.weight" in names
    assert any(n.startswith("vision_tower.vision_model.encoder.layers.") for n in names)
    assert ("language_model.lm_head.weight" in names) != ours.config.text.tie_word_embeddings
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava" and config["image_token_index"] == IMAGE_TOKEN_ID
    assert "rope_theta" in config["text_config"] and "rope_parameters" not in config["text_config"]
    assert config["image_seq_length"] == ours.config.num_image_tokens
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "CLIPImageProcessor" and pre["crop_size"]["height"] == 28
    assert (out / "generation_config.json").is_file() and (out / "processor_config.json").is_file()


def test_hf_to_minillava_to_hf_bit_for_bit(exported):
    """The hub's own files (4.x names) come back unchanged: same names, dtypes and bytes."""
    _, _, _, out, tmp_path = exported
    assert_same_tensors(tensors(out), tensors(tmp_path / "hf"))


def test_minillava_to_hf_to_minillava_bit_for_bit(exported):
    _, ours, converted, out, tmp_path = exported
    back = tmp_path / "back"
    assert convert_main([str(out), str(back)]) == 0
    assert_same_tensors(tensors(back), tensors(converted))
    again = minillava.load(back)
    # The export spells out what minillava does by default (greedy, 512 tokens, the placeholder never generated):
    # the generation settings only gain those.
    added = {"do_sample": False, "max_new_tokens": 512, "suppress_tokens": [IMAGE_TOKEN_ID]}
    assert again.config.generation == {**ours.config.generation, **added}
    assert dataclasses.replace(again.config, generation={}) == dataclasses.replace(ours.config, generation={})


def test_fp16_export_round_trip(tmp_path):
    hf = make_hf_model(seed=9)
    _, converted = convert_hf(hf, tmp_path)
    half = tmp_path / "half"
    assert convert_main([str(converted), str(half), "--dtype", "float16"]) == 0
    out, back = tmp_path / "hf16", tmp_path / "back16"
    assert convert_main(["--to", "hf", str(half), str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    assert convert_main([str(out), str(back)]) == 0
    assert_same_tensors(tensors(back), tensors(half))
    assert {t.dtype for t in tensors(out).values()} == {torch.float16}


@pytest.fixture(scope="module")
def original_converted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("original")
    hf = make_original_model(seed=4)
    src = save_original(hf, tmp_path / "llava-v1.5-7b")
    clip = save_clip_dir(hf, tmp_path / "clip")
    dst = tmp_path / "converted"
    assert convert_main([str(src), str(dst), "--vision-tower", str(clip)]) == 0
    return hf, dst, tmp_path


def test_placeholder_outside_vocab_is_refused_without_pad_vocab(original_converted, capsys):
    _, dst, tmp_path = original_converted
    assert convert_main(["--to", "hf", str(dst), str(tmp_path / "refused")]) == 1
    err = capsys.readouterr().err
    assert "outside the vocabulary" in err and "--pad-vocab" in err
    assert not (tmp_path / "refused").exists()


def test_pad_vocab_export_of_an_original_checkpoint(original_converted):
    hf, dst, tmp_path = original_converted
    out = tmp_path / "padded"
    assert convert_main(["--to", "hf", str(dst), str(out), "--pad-vocab", "--dtype", "float32"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["image_token_index"] == ORIGINAL_PLACEHOLDER
    assert config["text_config"]["vocab_size"] == 128  # 96 + 1 rounded up to a multiple of 64
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "LlavaImageProcessor" and pre["do_pad"] is True
    tok = json.loads((out / "tokenizer_config.json").read_text())
    assert tok["added_tokens_decoder"][str(ORIGINAL_PLACEHOLDER)]["content"] == "<image>"
    assert json.loads((out / "added_tokens.json").read_text()) == {"<image>": ORIGINAL_PLACEHOLDER}
    reloaded = load_hf(out)
    k = reloaded.config.image_seq_length
    batch = sentinel_batch(seed=13)
    with torch.no_grad():
        expected = hf(
            input_ids=expand_sentinels(batch["input_ids"], k, IMAGE_TOKEN_ID), pixel_values=batch["pixel_values"]
        )
        got = reloaded(
            input_ids=expand_sentinels(batch["input_ids"], k, ORIGINAL_PLACEHOLDER), pixel_values=batch["pixel_values"]
        )
    # Real tokens' logits are the same; the appended rows only add columns.
    assert_close(got.logits[..., :ORIGINAL_PLACEHOLDER], expected.logits[..., :ORIGINAL_PLACEHOLDER], **FP32)


def test_export_refuses_projectors_llava_hf_lacks(tmp_path, capsys):
    hf = make_original_model(seed=2, projector="linear")
    src = save_original(hf, tmp_path / "llava-linear", projector="linear")
    clip = save_clip_dir(hf, tmp_path / "clip")
    assert convert_main([str(src), str(tmp_path / "conv"), "--vision-tower", str(clip)]) == 0
    assert convert_main(["--to", "hf", str(tmp_path / "conv"), str(tmp_path / "out"), "--pad-vocab"]) == 1
    assert "'linear'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_export_image_processor_loads_in_transformers(original_converted):
    from transformers import AutoImageProcessor

    _, dst, tmp_path = original_converted
    out = tmp_path / "padded-processor"
    assert convert_main(["--to", "hf", str(dst), str(out), "--pad-vocab"]) == 0
    processor = AutoImageProcessor.from_pretrained(out)
    assert processor.do_pad is True
    assert processor.crop_size["height"] == 28


def test_v5_layout_input_exports_v4_names(tmp_path):
    """A transformers 5.x save (vision tower without ``vision_model.``) exports with the hub's 4.x names."""
    hf = make_hf_model(seed=1)
    _, converted = convert_hf(hf, tmp_path)  # save_hf default: the 5.x layout
    out = tmp_path / "out"
    assert convert_main(["--to", "hf", str(converted), str(out)]) == 0
    theirs = tensors(tmp_path / "hf")
    ours = tensors(out)
    renamed = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in theirs.items()}
    assert_same_tensors(ours, renamed)
    assert save_hf  # the helper that wrote tmp_path / "hf"
