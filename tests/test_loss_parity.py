"""The training loss and its gradients against transformers' LlavaForConditionalGeneration, fp32 on CPU.

The batch is what training feeds: right-padded rows of different lengths, one or two images per row,
labels ``-100`` on the prompt, on every image placeholder and on the padding. The gradient with respect
to ``pixel_values`` flows back through the decoder, the splice, the projector and the tower, so it checks
the whole backward path at once; a few parameter gradients pin down each part on its own.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from minillava.model import causal_lm_loss
from tests.hf_reference import IMAGE_TOKEN_ID

FP32 = {"rtol": 1e-5, "atol": 1e-5}
PAD = 0

# minillava parameter name -> transformers 5.x in-memory name.
PARAMS = {
    "llm.layers.0.self_attn.q_proj.weight": "model.language_model.layers.0.self_attn.q_proj.weight",
    "llm.layers.1.mlp.down_proj.weight": "model.language_model.layers.1.mlp.down_proj.weight",
    "llm.layers.1.input_layernorm.weight": "model.language_model.layers.1.input_layernorm.weight",
    "llm.embed_tokens.weight": "model.language_model.embed_tokens.weight",
    "llm.norm.weight": "model.language_model.norm.weight",
    "llm.lm_head.weight": "lm_head.weight",
    "projector.layers.0.weight": "model.multi_modal_projector.linear_1.weight",
    "projector.layers.1.bias": "model.multi_modal_projector.linear_2.bias",
    "vision.encoder.layers.0.mlp.fc1.weight": "model.vision_tower.encoder.layers.0.mlp.fc1.weight",
    "vision.embeddings.patch_embedding.weight": "model.vision_tower.embeddings.patch_embedding.weight",
    "vision.embeddings.class_embedding": "model.vision_tower.embeddings.class_embedding",
}


def training_batch(k: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Three right-padded rows: one image mid-prompt; two images; text only. Answers are supervised."""
    gen = torch.Generator().manual_seed(seed)

    def text(n: int) -> torch.Tensor:
        return torch.randint(3, IMAGE_TOKEN_ID, (n,), generator=gen)

    img = torch.full((k,), IMAGE_TOKEN_ID)
    # (prompt pieces, answer): the answer (and its end token 2) is the only supervised part.
    rows = [
        ([text(3), img, text(5)], torch.cat([text(6), torch.tensor([2])])),
        ([img, text(4), img, text(2)], torch.cat([text(3), torch.tensor([2])])),
        ([text(7)], torch.cat([text(9), torch.tensor([2])])),
    ]
    ids, labels = [], []
    for prompt, answer in rows:
        prompt = torch.cat(prompt)
        ids.append(torch.cat([prompt, answer]))
        labels.append(torch.cat([torch.full_like(prompt, -100), answer]))
    length = max(len(r) for r in ids)
    input_ids = torch.full((3, length), PAD)
    label_rows = torch.full((3, length), -100)
    mask = torch.zeros(3, length, dtype=torch.long)
    for i, (r, lab) in enumerate(zip(ids, labels, strict=True)):
        input_ids[i, : len(r)], label_rows[i, : len(r)], mask[i, : len(r)] = r, lab, 1
    assert (mask == 0).any(dim=1).sum() == 2, "two rows must carry right padding"
    pixels = torch.randn(3, 3, 28, 28, generator=gen)
    return {"input_ids": input_ids, "pixel_values": pixels, "attention_mask": mask, "labels": label_rows}


@pytest.fixture(scope="module")
def pair(hf_reference):
    hf, ours, _ = hf_reference(seed=11)
    return hf, ours


def loss_and_grads(model, batch, names):
    model.zero_grad(set_to_none=True)
    pixels = batch["pixel_values"].clone().requires_grad_(True)
    loss = model(**{**batch, "pixel_values": pixels}).loss
    loss.backward()
    params = dict(model.named_parameters())
    return loss.detach(), pixels.grad, {n: params[n].grad for n in names}


def test_loss_and_gradients_match_transformers(pair):
    hf, ours = pair
    batch = training_batch(ours.config.num_image_tokens)
    hf.train()  # no dropout in either model; train() only to be sure nothing is skipped
    ours.train()
    ref_loss, ref_pix, ref_grads = loss_and_grads(hf, batch, PARAMS.values())
    loss, pix, grads = loss_and_grads(ours, batch, PARAMS)
    assert 1.0 < ref_loss < 50.0, f"reference loss {ref_loss} looks degenerate"
    assert_close(loss, ref_loss, **FP32)
    assert ref_pix.abs().max() > 0
    assert_close(pix, ref_pix, **FP32)
    for ours_name, hf_name in PARAMS.items():
        assert ref_grads[hf_name] is not None and ref_grads[hf_name].abs().max() > 0, hf_name
        assert_close(grads[ours_name], ref_grads[hf_name], **FP32, msg=lambda m, n=ours_name: f"{n}: {m}")


def test_loss_is_mean_over_supervised_tokens_only(pair):
    """Padding does not count (extending it changes nothing),
    and the summed form the trainer uses divides to the same mean."""
    _, ours = pair
    batch = training_batch(ours.config.num_image_tokens, seed=1)
    with torch.no_grad():
        loss = ours(**batch).loss
        wider = dict(batch)
        extra = 5
        wider["input_ids"] = torch.nn.functional.pad(batch["input_ids"], (0, extra), value=PAD)
        wider["attention_mask"] = torch.nn.functional.pad(batch["attention_mask"], (0, extra), value=0)
        wider["labels"] = torch.nn.functional.pad(batch["labels"], (0, extra), value=-100)
        assert_close(ours(**wider).loss, loss, **FP32)
        logits = ours(batch["input_ids"], batch["pixel_values"], batch["attention_mask"]).logits
        total = causal_lm_loss(logits, batch["labels"], reduction="sum")
    assert_close(total / int((batch["labels"][:, 1:] != -100).sum()), loss, **FP32)
