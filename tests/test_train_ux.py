"""What a person training sees: Ctrl-C saves a checkpoint that resumes the run, held-out scores with
``--eval-data``, a progress line with the smoothed loss and the time left, and the precision picked per device."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.testing import assert_close

import minillava
from minillava.chat import get_template
from minillava.config import BUNDLED_MODEL
from minillava.data import LlavaDataset, sample_messages
from minillava.generate import generate
from minillava.processor import load_processor
from minillava.shapes.data import IMAGE_SIZE, generate_dataset
from minillava.train import train
from minillava.train.config import resolve_precision
from minillava.train.evaluate import evaluate, normalize
from tests.next_reference import make_next_checkpoint, random_image
from tests.tiny_models import read_log, train_config

STEPS = 16


def test_ctrl_c_saves_a_checkpoint_that_resumes_the_run(train_setup, tmp_path):
    model, data, images = train_setup
    output = tmp_path / "interrupted"
    argv = ["--model", str(model), "--data", str(data), "--image-folder", str(images), "--output", str(output)]
    argv += ["--max-steps", str(STEPS), "--batch-size", "4", "--lr", "3e-3", "--warmup-ratio", "0"]
    argv += ["--precision", "fp32", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen([sys.executable, "-m", "minillava.train", *argv], stderr=subprocess.PIPE, text=True, env=env)
    log = output / "log.jsonl"
    deadline = time.monotonic() + 240
    while not (log.is_file() and len(log.read_text().splitlines()) >= 2):
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.02)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=240)
    assert run.returncode == 130, err
    done = len(read_log(output))
    assert 2 <= done < STEPS
    checkpoint = output / f"checkpoint-{done}"
    assert f"interrupted after step {done}: saved {checkpoint}" in err and "--resume" in err
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == done
    assert not (output / "model.safetensors").exists()  # an unfinished run leaves no final model

    torch.set_num_threads(1)
    resumed = train(train_config(train_setup, output, max_steps=STEPS, resume="latest"))
    straight = train(train_config(train_setup, tmp_path / "straight", max_steps=STEPS))
    # The interrupted process may have used other threads than this one: equal to float rounding.
    assert_close(torch.tensor(resumed["losses"]), torch.tensor(straight["losses"][done:]), rtol=1e-5, atol=1e-6)
    assert [r["step"] for r in read_log(output)] == list(range(1, STEPS + 1))


@pytest.fixture(scope="module")
def shapes_eval(tmp_path_factory):
    """(bundled processor, held-out shapes conversations, their folder). Each conversation's first answer is made
    long, so only its last answer counts as short: scoring any other answer changes the counts."""
    root = tmp_path_factory.mktemp("shapes-eval")
    records = json.loads(generate_dataset(root, 8, 0, "heldout", IMAGE_SIZE)["qa"].read_text())
    for record in records:
        record["conversations"][1]["value"] = "That is a question I will answer with many words."
    path = root / "eval.json"
    path.write_text(json.dumps(records))
    return load_processor(BUNDLED_MODEL), path, root


def expected_scores(model, dataset, data, folder) -> tuple[float, int, int, int]:
    """(loss, tokens, exact, short) computed sample by sample: the model's own loss weighted by supervised tokens, and
    the processor + ``generate`` answer to each conversation's last question where the reference is short."""
    processor, template = dataset.processor, dataset.template
    total, count = 0.0, 0
    for i in range(len(dataset)):
        item = dataset[i]
        labels = item["labels"][None]
        with torch.no_grad():
            out = model(
                item["input_ids"][None], item["pixel_values"], image_sizes=item.get("image_sizes"), labels=labels
            )
        n = int((labels[:, 1:] != -100).sum())
        total, count = total + float(out.loss) * n, count + n
    exact = short = 0
    for record in json.loads(data.read_text()):
        messages, image_paths = sample_messages(record)
        reference = normalize(messages[-1]["content"])
        if len(reference.split()) > 5:
            continue
        batch = processor(processor.format_chat(messages[:-1], template), images=[folder / p for p in image_paths])
        new = generate(model.eval(), **batch, max_new_tokens=40)
        stop = get_template(template).stop_strings[0]
        exact += normalize(processor.decode(new[0]).split(stop)[0]) == reference
        short += 1
    model.train()
    return total / count, count, exact, short


def test_eval_scores_loss_and_short_answers(shapes_eval):
    processor, data, folder = shapes_eval
    dataset = LlavaDataset(data, folder, processor, template="vicuna_v1")
    model = minillava.load(BUNDLED_MODEL).train()
    result = evaluate(model, dataset, 8, torch.autocast("cpu", enabled=False), torch.device("cpu"))
    assert model.training  # handed back as the trainer left it
    loss, tokens, exact, short = expected_scores(model, dataset, data, folder)
    assert result.tokens == tokens and result.loss == pytest.approx(loss, rel=1e-5)
    assert short >= 6 and (result.short, result.exact) == (short, exact)
    assert exact >= short // 2  # the bundled model answers most held-out questions


def test_eval_on_llava_next_images_of_many_sizes(tmp_path):
    """LLaVA-1.6 samples: placeholder counts vary with each image's size, and the tiles are batched padded."""
    model_dir = make_next_checkpoint(tmp_path / "model")
    records = []
    for i, size in enumerate([(20, 20), (30, 50), (90, 90), (40, 100)]):
        random_image(*size, seed=i).save(tmp_path / f"{i}.png")
        turns = [{"from": "human", "value": "<image>\nWhat shape?"}, {"from": "gpt", "value": "Wide."}]
        records.append({"id": str(i), "image": f"{i}.png", "conversations": turns})
    data = tmp_path / "eval.json"
    data.write_text(json.dumps(records))
    processor = load_processor(model_dir)
    dataset = LlavaDataset(data, tmp_path, processor, template=processor.template.name)
    model = minillava.load(model_dir).train()
    result = evaluate(model, dataset, 3, torch.autocast("cpu", enabled=False), torch.device("cpu"))
    loss, tokens, exact, short = expected_scores(model, dataset, data, tmp_path)
    assert result.tokens == tokens and result.loss == pytest.approx(loss, rel=1e-5)
    assert (result.short, result.exact) == (short, exact) and short == 4


def test_eval_data_is_scored_every_n_steps_and_at_the_end(train_setup, tmp_path, capsys):
    _, data, _ = train_setup
    output = tmp_path / "out"
    train(train_config(train_setup, output, max_steps=5, eval_data=str(data), eval_every=2, progress=True))
    records = [json.loads(line) for line in (output / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 5]
    assert all(r["tokens"] > 0 and r["short_answers"] > 0 for r in records)
    err = capsys.readouterr().err
    assert "step 2: eval loss" in err and "exact match" in err
    assert "(smoothed " in err and ", eta " in err  # the progress line


def test_precision_auto_is_fp32_on_cpu_and_bf16_on_gpu():
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("bf16", "cpu") == "bf16" and resolve_precision("fp32", "cuda") == "fp32"
