"""The llava-hf converter on both on-disk layouts, both config forms, single-file and sharded."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from tests.hf_reference import batch_inputs, convert_hf, make_hf_model

CASES = {
    "v5-single": {"layout": "v5"},
    "v4-keys-sharded": {"layout": "v4", "max_shard_size": "40KB"},
    "v4-config-rope-linear": {"layout": "v4", "config_form": "v4"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_layout_converts_to_equal_logits(case, tmp_path):
    rope = {"rope": {"rope_type": "linear", "factor": 3.0}} if "rope" in case else {}
    hf = make_hf_model(seed=7, **rope)
    ours, dst = convert_hf(hf, tmp_path, **CASES[case])
    keys = [json.loads(p.read_text()) for p in (tmp_path / "hf").glob("*.index.json")]
    if "sharded" in case:
        assert keys and len(set(keys[0]["weight_map"].values())) > 1, "the source should be sharded"
    if "rope" in case:
        text = json.loads((tmp_path / "hf" / "config.json").read_text())["text_config"]
        assert "rope_scaling" in text and "rope_parameters" not in text
        assert ours.config.text.rope_scaling == {"rope_type": "linear", "factor": 3.0}
    inputs = batch_inputs(ours.config.num_image_tokens, seed=1)
    with torch.no_grad():
        assert_close(ours(**inputs).logits, hf(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_converted_sharded_output_loads(tmp_path):
    import minillava
    from weights_convert.__main__ import main as convert_main

    hf = make_hf_model(seed=8)
    _, dst = convert_hf(hf, tmp_path)
    resharded = tmp_path / "resharded"
    model = minillava.load(dst)
    minillava.save(model, resharded, max_shard_bytes=50_000)
    assert (resharded / "model.safetensors.index.json").is_file()
    again = minillava.load(resharded)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert convert_main([str(tmp_path / "hf"), str(dst)]) == 1, "a non-empty destination must be refused"
