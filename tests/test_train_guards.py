"""A training run stops instead of spinning, never mixes with another run's checkpoints, and never loses the model
it starts from or the one it replaces."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import minillava
from minillava.train import train
from tests.tiny_models import make_dataset, read_log, train_config


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def corrupt_data(root: Path, n: int) -> tuple[Path, Path]:
    """``n`` samples whose image file exists but cannot be decoded: ``(data file, image folder)``."""
    images = root / "images"
    images.mkdir(parents=True)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    turns = [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "Red."}]
    records = [{"id": f"bad{i}", "image": "broken.png", "conversations": turns} for i in range(n)]
    data = root / "bad.json"
    data.write_text(json.dumps(records))
    return data, images


def test_a_run_without_usable_samples_stops_instead_of_spinning(train_setup, tmp_path, capsys):
    data, images = corrupt_data(tmp_path, 5)

    def run(output: str, **options):
        cfg = train_config(train_setup, tmp_path / output, data=str(data), image_folder=str(images), **options)
        return train(cfg)

    common = {"batch_size": 1, "max_steps": 2, "skip_bad_samples": True}
    with pytest.raises(ValueError, match=rf"a whole pass over {data} gave no step: 5 bad sample\(s\) skipped"):
        run("a", **common)
    with pytest.raises(ValueError, match=r"3 steps in a row had no supervised token .*--max-skipped-steps"):
        run("b", **common, max_skipped_steps=3)
    assert capsys.readouterr().err.count("no supervised token in the global batch") == 5 + 3


def test_a_fresh_run_refuses_an_output_that_holds_another_run(train_setup, tmp_path):
    out = tmp_path / "out"
    train(train_config(train_setup, out, max_steps=2, save_every=1))
    with pytest.raises(FileExistsError, match=rf"{out} holds another run.*--resume.*--force"):
        train(train_config(train_setup, out, max_steps=1, lr=1e-3))
    # --force starts over there: the earlier run's checkpoints and log go, so a later --resume cannot take them.
    train(train_config(train_setup, out, max_steps=1, lr=1e-3, force=True))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == []
    assert [r["step"] for r in read_log(out)] == [1]


def test_resume_refuses_a_checkpoint_of_another_run(train_setup, tmp_path):
    out = tmp_path / "out"
    train(train_config(train_setup, out, max_steps=2, save_every=1))
    with pytest.raises(ValueError, match=r"checkpoint-2 belongs to another run: lr 0.003 there, 0.001 here"):
        train(train_config(train_setup, out, max_steps=3, lr=1e-3, resume="latest"))
    other = make_dataset(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match=rf"another run: the data file \({other}\) differs"):
        train(train_config(train_setup, out, max_steps=3, data=str(other), resume="latest"))
    # The same run goes on, also for more steps than it first had.
    assert train(train_config(train_setup, out, max_steps=3, resume="latest"))["steps"] == 3


@pytest.mark.parametrize("where", ["the model", "a folder holding it", "inside it"])
def test_the_starting_model_is_never_the_output(train_setup, tmp_path, where):
    model = Path(shutil.copytree(train_setup[0], tmp_path / "model"))
    output = {"the model": model, "a folder holding it": tmp_path, "inside it": model / "run"}[where]
    before = snapshot(model)
    for force in (False, True):
        with pytest.raises(ValueError, match=rf"--output {output} .* --model {model}"):
            train(train_config((model, *train_setup[1:]), output, max_steps=1, force=force))
    assert snapshot(model) == before


def test_a_failure_while_replacing_the_trained_model_keeps_the_old_one(train_setup, tmp_path, monkeypatch):
    out = tmp_path / "out"
    train(train_config(train_setup, out, max_steps=1, save_every=1))
    assert hidden(out) == []
    old = minillava.load(out).state_dict()
    real_replace, calls = os.replace, []

    def replace_once_failing(src, dst):
        if Path(dst).parent == out and Path(dst).name.startswith("model") and not calls:
            calls.append(dst)
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_once_failing)
    with pytest.raises(OSError, match="No space left on device"):
        train(train_config(train_setup, out, max_steps=2, resume="latest"))
    monkeypatch.undo()
    assert calls and hidden(out) == []
    kept = minillava.load(out).state_dict()
    assert all(torch.equal(kept[k], old[k]) for k in old)
