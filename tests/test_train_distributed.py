"""Two real torchrun processes (gloo, FSDP2) against one process with the same global batch.

Both runs see the same samples per optimizer step: the distributed sampler's permutation does not
depend on the number of processes, and process r takes every other sample of it. The loss of a step is
normalised by the global count of supervised tokens, so the two runs give the same losses up to float
rounding (gradients are reduced in a different order).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler

import minillava
from minillava.data import LlavaDataset
from minillava.processor import load_processor
from minillava.train import train
from tests.tiny_models import make_dataset, read_log, train_config

REPO = Path(__file__).resolve().parents[1]
STEPS = 3


def torchrun(args: list[str], nproc: int = 2, timeout: float = 150) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run(
        [*cmd, "-m", "minillava.train", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def tiny(train_setup, tmp_path_factory):
    """The shared tiny checkpoint with a dataset of its own (more text-only samples)."""
    root = tmp_path_factory.mktemp("tiny2")
    return train_setup[0], make_dataset(root, n_image=10, n_text=6), root / "images"


def test_two_processes_give_the_one_process_losses(tiny, tmp_path):
    model, data, images = tiny
    # Global batch 4 either way: 2 processes x batch 1 x 2 accumulation steps, or 1 x 2 x 2.
    args = [
        "--model", str(model), "--data", str(data), "--image-folder", str(images), "--output", str(tmp_path / "two"),
        "--max-steps", str(STEPS), "--batch-size", "1", "--grad-accum", "2", "--lr", "3e-3", "--warmup-ratio", "0",
        "--precision", "fp32", "--save-every", str(STEPS), "--no-progress",
    ]  # fmt: skip
    run = torchrun(args)
    assert run.returncode == 0, run.stderr[-3000:]
    two = [r["loss"] for r in read_log(tmp_path / "two")]
    one = train(train_config(tiny, tmp_path / "one", max_steps=STEPS, batch_size=2, grad_accum=2))["losses"]
    print(f"\n1 process:   {one}\n2 processes: {two}")
    assert len(two) == STEPS
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=0)
    # Adam and clipping hide a wrong gradient scale from the losses; the logged (pre-clip) norm shows it.
    norms = [[r["grad_norm"] for r in read_log(tmp_path / name)] for name in ("one", "two")]
    torch.testing.assert_close(torch.tensor(norms[1]), torch.tensor(norms[0]), rtol=1e-5, atol=0)

    # Some process must have met a micro-batch without images (the zero-image path that keeps FSDP in step).
    ds = LlavaDataset(data, images, load_processor(model))
    text_only = {i for i, (_, _, paths) in enumerate(ds.samples) if not paths}
    per_rank = [list(DistributedSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=0)) for r in (0, 1)]
    assert any(idx in text_only for rank in per_rank for idx in rank[: STEPS * 2]), "no text-only micro-batch"

    # The checkpoint gathered on rank 0, and the final model, load with minillava.load.
    for path in (tmp_path / "two" / f"checkpoint-{STEPS}", tmp_path / "two"):
        loaded = minillava.load(path).state_dict()
        reference = minillava.load(tmp_path / "one").state_dict()
        assert loaded.keys() == reference.keys()
        for key, tensor in loaded.items():
            torch.testing.assert_close(tensor, reference[key], rtol=1e-4, atol=1e-5)
    state = json.loads((tmp_path / "two" / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == STEPS and state["global_batch"] == 4


def test_a_data_error_on_one_process_stops_both(tiny, tmp_path):
    """A corrupt image met by one process stops every process with the sample named (no hang)."""
    model, data, images = tiny
    records = json.loads(Path(data).read_text())
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    records[0] = {**records[0], "id": "bad-one", "image": str(corrupt)}
    records[0]["conversations"][0]["value"] = "<image>\nWhat color is the picture?"
    bad_data = tmp_path / "bad.json"
    bad_data.write_text(json.dumps(records))
    args = [
        "--model", str(model), "--data", str(bad_data), "--image-folder", str(images), "--output", str(tmp_path / "o"),
        "--epochs", "1", "--batch-size", "2", "--precision", "fp32", "--no-progress",
    ]  # fmt: skip
    run = torchrun(args, timeout=120)
    assert run.returncode != 0
    assert "sample 'bad-one'" in run.stderr and "corrupt.png" in run.stderr
    assert "another process failed" in run.stderr
