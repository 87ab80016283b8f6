"""The trainer on one process: stages, schedule, a real short run over a tiny dataset, resume, and errors.

Everything is real: a tiny random minillava checkpoint with a trained sentencepiece tokenizer, PNG files
written with Pillow, LLaVA-format JSON (``train_setup`` in ``conftest.py``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torch.testing import assert_close

import minillava
from minillava.checkpoint import CARRIED_FILES
from minillava.data import Collator, DataError, LlavaDataset, group_by_length, read_records, sample_messages
from minillava.model import IGNORE_INDEX, Llava, causal_lm_loss
from minillava.processor import load_processor
from minillava.train import (
    NonFiniteLoss,
    lr_at,
    main,
    set_trainable,
    stage_template,
    train,
    with_dummy_image,
)
from tests.tiny_models import make_dataset, read_log, train_config

# --- a real run ---


@pytest.fixture(scope="module")
def short_run(train_setup, tmp_path_factory):
    """8 steps with a checkpoint every 4: ``(output directory, losses)``."""
    output = tmp_path_factory.mktemp("short") / "a"
    return output, train(train_config(train_setup, output, max_steps=8, save_every=4))["losses"]


def test_short_run_reduces_the_loss(short_run):
    _, losses = short_run
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) / 2 < losses[0] - 0.5, f"loss did not go down: {losses}"


def test_log_has_a_record_per_step(short_run):
    output, losses = short_run
    records = read_log(output)
    assert [r["loss"] for r in records] == losses and [r["step"] for r in records] == list(range(1, 9))
    assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "supervised_tokens"} <= set(records[0])


def test_trained_model_and_checkpoints_load_as_minillava_directories(short_run):
    output, _ = short_run
    for path in (output, output / "checkpoint-4"):
        assert isinstance(minillava.load(path), Llava)
        assert load_processor(path).template.name == "vicuna_v1"


def test_trained_model_and_checkpoints_carry_every_file_beside_the_weights(short_run, train_setup):
    output, _ = short_run
    source = train_setup[0]
    carried = [name for name in CARRIED_FILES if (source / name).is_file()]
    assert {"tokenizer.model", "tokenizer.json", "chat_template.jinja"} <= set(carried)
    for path in (output, output / "checkpoint-4"):
        for name in carried:
            assert (path / name).read_bytes() == (source / name).read_bytes(), f"{path.name}/{name}"


def test_resume_repeats_the_uninterrupted_run_bit_for_bit(short_run, train_setup, tmp_path):
    output, losses = short_run
    resumed = train(train_config(train_setup, tmp_path / "b", max_steps=8, resume=str(output / "checkpoint-4")))
    assert resumed["losses"] == losses[4:]
    a, b = minillava.load(output).state_dict(), minillava.load(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_run_and_cli(train_setup, tmp_path):
    """Bit-for-bit reproducible on one process; the CLI runs the same job."""
    model, data, images = train_setup
    argv = [
        "--model", str(model), "--data", str(data), "--image-folder", str(images), "--output", str(tmp_path / "cli"),
        "--max-steps", "3", "--batch-size", "4", "--lr", "3e-3", "--warmup-ratio", "0", "--precision", "fp32",
        "--no-progress", "--seed", "5",
    ]  # fmt: skip
    assert main(argv) == 0
    again = train(train_config(train_setup, tmp_path / "api", max_steps=3, seed=5))
    assert [r["loss"] for r in read_log(tmp_path / "cli")] == again["losses"]
    other_seed = train(train_config(train_setup, tmp_path / "seed6", max_steps=3, seed=6))
    assert other_seed["losses"] != again["losses"]


def test_gradient_accumulation_gives_the_same_losses_and_gradient_norms(train_setup, tmp_path):
    """A global batch of 4 as one micro-batch or as two of 2. Adam (and clipping) hide a wrong gradient scale from
    the losses; the logged gradient norm (before clipping) shows it."""
    whole = train(train_config(train_setup, tmp_path / "whole", max_steps=3, batch_size=4, grad_accum=1))
    split = train(train_config(train_setup, tmp_path / "split", max_steps=3, batch_size=2, grad_accum=2))
    assert_close(torch.tensor(split["losses"]), torch.tensor(whole["losses"]), rtol=1e-5, atol=0)
    norms = [[r["grad_norm"] for r in read_log(tmp_path / name)] for name in ("whole", "split")]
    assert_close(torch.tensor(norms[1]), torch.tensor(norms[0]), rtol=1e-5, atol=0)


def test_pretrain_changes_only_the_projector(train_setup, tmp_path):
    model_dir = train_setup[0]
    data = make_dataset(tmp_path, n_image=8, n_text=0)
    images = str(tmp_path / "images")
    train(
        train_config(train_setup, tmp_path / "out", stage="pretrain", max_steps=2, data=str(data), image_folder=images)
    )
    before, after = minillava.load(model_dir).state_dict(), minillava.load(tmp_path / "out").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if k.startswith("projector.")}
    assert load_processor(tmp_path / "out").template.name == "plain"


def test_finetune_changes_projector_and_decoder_not_the_tower(train_setup, tmp_path):
    train(train_config(train_setup, tmp_path / "out", max_steps=2))
    before, after = minillava.load(train_setup[0]).state_dict(), minillava.load(tmp_path / "out").state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"projector", "llm"}


def test_bf16_precision_runs_the_linear_layers_in_bf16(train_setup, tmp_path):
    dtypes: set[torch.dtype] = set()

    def record(module, args, output):
        if isinstance(module, nn.Linear):
            dtypes.add(output.dtype)

    handle = nn.modules.module.register_module_forward_hook(record)
    try:
        result = train(train_config(train_setup, tmp_path / "out", max_steps=1, precision="bf16"))
    finally:
        handle.remove()
    assert dtypes == {torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(result["losses"])))


@pytest.fixture
def block_calls(train_setup, monkeypatch) -> list[int]:
    """Counts the decoder blocks' forward computations (a recompute in backward counts again)."""
    block = type(minillava.load(train_setup[0]).llm.layers[0])
    forward, calls = block.forward, []

    def counted(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(block, "forward", counted)
    return calls


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_checkpointing_recomputes_each_block_in_backward(train_setup, tmp_path, block_calls, checkpointing):
    # One step of one micro-batch through two decoder blocks: each runs once, and once more when recomputed.
    train(train_config(train_setup, tmp_path / "out", max_steps=1, activation_checkpointing=checkpointing))
    assert len(block_calls) == (4 if checkpointing else 2)


def test_activation_checkpointing_changes_no_number(train_setup, tmp_path):
    plain = train(train_config(train_setup, tmp_path / "plain", max_steps=3))
    recomputed = train(train_config(train_setup, tmp_path / "ckpt", max_steps=3, activation_checkpointing=True))
    assert recomputed["losses"] == plain["losses"]


# --- stages, schedule, loss pieces ---


def test_pretrain_trains_only_the_projector(train_setup):
    model = minillava.load(train_setup[0])
    assert set(set_trainable(model, "pretrain")) == {
        n for n, _ in model.named_parameters() if n.startswith("projector.")
    }


def test_finetune_trains_projector_and_decoder(train_setup):
    model = minillava.load(train_setup[0])
    trainable = set(set_trainable(model, "finetune"))
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith(("projector.", "llm."))}


def test_freezing_copies_no_weight(train_setup):
    model = minillava.load(train_setup[0])
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    set_trainable(model, "pretrain")
    set_trainable(model, "finetune", train_vision=True)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == pointers


def test_a_frozen_tower_runs_without_autograd(train_setup):
    model = minillava.load(train_setup[0])
    set_trainable(model, "finetune")
    pixels = torch.randn(1, 3, 28, 28, requires_grad=True)  # even pixels that want a gradient get none through it
    assert not model.vision(pixels, [-2]).requires_grad


def test_train_vision_trains_the_tower_layers_that_run(train_setup):
    trainable = set(set_trainable(minillava.load(train_setup[0]), "finetune", train_vision=True))
    # Feature layer -2 of 3: layers 0-1 run and train; layer 2 and post_layernorm never run.
    assert "vision.encoder.layers.1.mlp.fc1.weight" in trainable and "vision.embeddings.class_embedding" in trainable
    assert not any(n.startswith(("vision.encoder.layers.2.", "vision.post_layernorm.")) for n in trainable)


def test_stage_templates():
    assert stage_template("pretrain", "llava_v1") == "plain"
    assert stage_template("finetune", "llava_v1") == "llava_v1"
    # After stage 1 (plain) or from a llava-hf checkpoint (no end-of-turn token): LLaVA-1.5's vicuna_v1.
    assert stage_template("finetune", "plain") == stage_template("finetune", "llava_hf") == "vicuna_v1"
    assert stage_template("finetune", None) == "vicuna_v1"


def test_schedule_is_transformers_cosine_with_warmup():
    from transformers import get_cosine_schedule_with_warmup

    total, warmup, base = 50, 4, 2e-5
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = get_cosine_schedule_with_warmup(opt, warmup, total)
    for step in range(total):
        assert lr_at(step, total, warmup, base) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-20)
        opt.step()
        sched.step()


def test_dummy_image_changes_neither_loss_nor_gradients(train_setup):
    """The zero image FSDP needs in an image-less micro-batch contributes exactly nothing."""
    model = minillava.load(train_setup[0])
    set_trainable(model, "finetune")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 700, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :3] = IGNORE_INDEX
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": None}

    def grads(b):
        model.zero_grad(set_to_none=True)
        logits = model(b["input_ids"], b["pixel_values"], b["attention_mask"]).logits
        total = causal_lm_loss(logits, b["labels"], reduction="sum")
        count = int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
        total.backward()
        return total.detach(), count, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_count, plain_grads = grads(batch)
    dummy = with_dummy_image(batch, model.config, pad_token_id=0)
    assert dummy["pixel_values"].shape[0] == 1 and dummy["input_ids"].shape[1] == 9 + model.config.num_image_tokens
    loss, count, dummy_grads = grads(dummy)
    assert count == plain_count
    assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    for name, grad in plain_grads.items():
        assert_close(dummy_grads[name], grad, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert all(float(dummy_grads[n].abs().max()) == 0.0 for n in dummy_grads if n.startswith("projector."))


# --- data ---


def test_collator_right_pads_and_keeps_images_in_order(train_setup):
    proc = load_processor(train_setup[0])
    ds = LlavaDataset(train_setup[1], train_setup[2], proc)
    items = [ds[i] for i in range(len(ds))][:6]
    batch = Collator(proc.pad_token_id)(items)
    lengths = [len(item["input_ids"]) for item in items]
    assert batch["input_ids"].shape == (6, max(lengths))
    for row, n in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["input_ids"][row, n:] == proc.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
    expected = torch.cat([item["pixel_values"] for item in items if item["pixel_values"] is not None])
    assert torch.equal(batch["pixel_values"], expected)
    assert batch["ids"] == [item["id"] for item in items]


def test_group_by_length_batches_similar_lengths_in_a_seeded_order():
    rng = random.Random(0)
    lengths = [rng.randint(5, 200) for _ in range(1000)]
    indices = list(range(1000))
    rng.shuffle(indices)
    grouped = group_by_length(indices, lengths, batch_size=8, seed=3, megabatch=10)
    assert sorted(grouped) == sorted(indices)  # a permutation: every sample once
    assert grouped == group_by_length(indices, lengths, batch_size=8, seed=3, megabatch=10)
    assert grouped != group_by_length(indices, lengths, batch_size=8, seed=4, megabatch=10)

    def padding(order):  # padded token slots over batches of 8
        batches = [[lengths[i] for i in order[k : k + 8]] for k in range(0, len(order), 8)]
        return sum(len(b) * max(b) - sum(b) for b in batches)

    assert padding(grouped) < 0.2 * padding(indices)  # measured 12%
    # Batches do not run from long to short: the megabatch's batches are shuffled.
    first = [max(lengths[i] for i in grouped[k : k + 8]) for k in range(0, 80, 8)]
    assert first != sorted(first, reverse=True)
    # Batches of 7: 1000 = 14 megabatches of 70 + a tail of 20 = two batches + a short batch of 6, which comes
    # last and holds the tail's six shortest samples; every earlier batch is full.
    short = group_by_length(indices, lengths, batch_size=7, seed=3, megabatch=10)
    assert sorted(short) == sorted(indices)
    tail = sorted(indices[980:], key=lambda i: lengths[i], reverse=True)
    assert sorted(short[-6:]) == sorted(tail[14:])
    assert sorted(short[980:994]) == sorted(tail[:14])


def test_group_by_length_run_resumes_bit_for_bit(train_setup, tmp_path):
    first = train(
        train_config(train_setup, tmp_path / "a", max_steps=6, save_every=3, group_by_length=True, batch_size=3)
    )
    plain = train(train_config(train_setup, tmp_path / "plain", max_steps=6, batch_size=3))
    assert first["losses"] != plain["losses"]  # another order of the same samples
    second = train(
        train_config(
            train_setup,
            tmp_path / "b",
            max_steps=6,
            group_by_length=True,
            batch_size=3,
            resume=str(tmp_path / "a" / "checkpoint-3"),
        )
    )
    assert second["losses"] == first["losses"][3:]


def test_jsonl_and_llava_image_marker_rule(tmp_path):
    turns = [{"from": "human", "value": "Why?\n<image>"}, {"from": "gpt", "value": "x"}]
    rows = [
        {"id": 1, "image": "a.png", "conversations": turns},
        {"id": 2, "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records = read_records(path)
    assert len(records) == 2
    messages, images = sample_messages(records[0])
    assert messages[0]["content"] == "<image>\nWhy?" and images == ["a.png"]  # preprocess_multimodal
    assert sample_messages(records[1])[1] == []


# --- errors ---


def write(tmp_path: Path, records: list[dict]) -> Path:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    return path


def good(i: int) -> dict:
    return {
        "id": f"ok{i}",
        "image": "0.png",
        "conversations": [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "Red."}],
    }


def test_missing_image_stops_naming_sample_and_file_or_is_skipped(train_setup, tmp_path):
    bad = {**good(0), "id": "lost", "image": "missing/nowhere.png"}
    data = write(tmp_path, [good(1), good(2), bad, good(3), good(4)])
    with pytest.raises(DataError, match=r"(?s)sample 'lost'.*missing/nowhere\.png.*--skip-bad-samples"):
        train(train_config(train_setup, tmp_path / "out", data=str(data), max_steps=1))
    result = train(train_config(train_setup, tmp_path / "out", data=str(data), max_steps=1, skip_bad_samples=True))
    assert result["skipped"] == 1 and result["steps"] == 1


def test_unreadable_image_names_sample_and_file_or_is_skipped(train_setup, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (28, 28), (1, 2, 3)).save(images / "0.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    data = write(tmp_path, [good(1), {**good(0), "id": "corrupt", "image": "broken.png"}])
    argv = [
        "--model", str(train_setup[0]), "--data", str(data), "--image-folder", str(images),
        "--output", str(tmp_path / "o"),
        "--max-steps", "1", "--batch-size", "2", "--precision", "fp32", "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "sample 'corrupt'" in err and "broken.png" in err
    assert main([*argv, "--skip-bad-samples"]) == 0
    assert read_log(tmp_path / "o")[0]["skipped"] == 1


@pytest.mark.parametrize(
    "conversations, message",
    [
        ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "does not alternate"),
        ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}], "does not alternate"),
        ([{"from": "human", "value": "only a question"}], "no assistant"),
        ([{"from": "robot", "value": "a"}], "unknown speaker"),
    ],
)
def test_bad_conversations_are_named(train_setup, tmp_path, conversations, message):
    data = write(tmp_path, [good(1), {"id": "weird", "conversations": conversations}])
    with pytest.raises(DataError, match=rf"sample 'weird'.*{message}"):
        LlavaDataset(data, train_setup[2], load_processor(train_setup[0]))


def test_long_samples_are_cut_outside_images_or_refused(train_setup, tmp_path):
    proc = load_processor(train_setup[0])
    long = {**good(0), "id": "long"}
    long["conversations"][1]["value"] = "The picture is red. " * 30
    data = write(tmp_path, [long])
    ds = LlavaDataset(data, train_setup[2], proc, max_length=80)
    item = ds[0]
    assert len(item["input_ids"]) == 80 and item["pixel_values"].shape[0] == 1
    assert int((item["input_ids"] == proc.image_token_id).sum()) == proc.num_image_tokens
    with pytest.raises(ValueError, match=r"sample 'long'.*longer than max_length 80"):
        LlavaDataset(data, train_setup[2], proc, max_length=80, refuse_long=True)[0]


def test_nan_loss_stops_with_step_and_last_checkpoint_survives(train_setup, tmp_path, capsys):
    # An absurd learning rate: step 1 is finite, its update overflows the weights, step 2's loss is NaN.
    cfg = train_config(train_setup, tmp_path / "out", lr=1e30, max_steps=4, save_every=1)
    with pytest.raises(NonFiniteLoss, match=r"at step 2.*checkpoint-1"):
        train(cfg)
    survivor = minillava.load(tmp_path / "out" / "checkpoint-1")
    assert all(torch.isfinite(t).all() for t in survivor.state_dict().values())
    assert not (tmp_path / "out" / "checkpoint-2").exists()
    assert [r["step"] for r in read_log(tmp_path / "out")] == [1]


def test_resume_refuses_a_different_global_batch(train_setup, tmp_path):
    train(train_config(train_setup, tmp_path / "out", max_steps=2, save_every=1))
    with pytest.raises(ValueError, match=r"global batch of 4 .* this run has 2"):
        train(train_config(train_setup, tmp_path / "out", max_steps=3, batch_size=2, resume="latest"))
