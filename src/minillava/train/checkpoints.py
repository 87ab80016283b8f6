"""Training checkpoints: the trained model, resumable ``checkpoint-N`` directories, and resuming from them.

Both are plain minillava directories (``minillava.load`` reads them) gathered on rank 0. A resumable one adds the
AdamW state (``optimizer.safetensors``, fp32, keyed by parameter name) and ``trainer_state.json`` (step, epoch,
position in the data, global batch, and the run it belongs to: its data and settings). Every directory is written
to a temporary one and renamed when complete; the trained model replaces the one in ``--output`` file by file with
``config.json`` last out and last in, so that the folder never holds a config with missing or foreign weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CARRIED_FILES, write_checkpoint
from ..config import LlavaConfig, read_json
from ..folders import TEMP_MARKER, atomic_directory, make_temp_folder, remove_stale_folders, temporary_folder
from ..model import Llava
from ..safetensors_io import open_safetensors, safetensors_files, write_state
from .config import TrainConfig
from .distributed import Runtime

STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
OPTIMIZER_INDEX_NAME = "optimizer.safetensors.index.json"
STATE_FORMAT = "minillava-trainer"
LOG_NAME = "log.jsonl"
RUN_FIELDS = (
    "stage",
    "train_vision",
    "template",
    "image_mode",
    "lr",
    "weight_decay",
    "max_grad_norm",
    "warmup_ratio",
    "max_length",
    "refuse_long",
    "precision",
    "seed",
    "group_by_length",
)
"""The settings that make a run's trajectory, besides its data: a checkpoint resumes only under the same ones.
(The global batch is checked on its own; the run's length may grow.)"""


def flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """A full (FQN-keyed) optimizer state dict as safetensors tensors plus JSON-able param groups."""
    tensors = {}
    for fqn, entries in state["state"].items():
        for key, value in entries.items():
            tensors[f"{fqn}::{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, groups


def read_optimizer_state(directory: Path, groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for path in safetensors_files(directory, OPTIMIZER_INDEX_NAME, OPTIMIZER_NAME):
        with open_safetensors(path, mapped=True) as get:
            for name in get.names:
                fqn, key = name.rsplit("::", 1)
                state.setdefault(fqn, {})[key] = get(name)
    return {"state": state, "param_groups": [{**g, "betas": tuple(g["betas"])} for g in groups]}


def gather_state(model: Llava, optimizer: torch.optim.Optimizer | None):
    """Full model (and optimizer) state dicts on rank 0 (empty elsewhere), on the CPU."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optim_state = None if optimizer is None else get_optimizer_state_dict(model, optimizer, options=options)
    return model_state, optim_state


def save_checkpoint(
    model: Llava,
    optimizer: torch.optim.Optimizer,
    rt: Runtime,
    directory: Path,
    config: LlavaConfig,
    carried_from: Path,
    trainer_state: dict[str, Any],
) -> None:
    """A resumable checkpoint: a minillava model directory plus ``optimizer.safetensors`` and the trainer state."""
    model_state, optim_state = gather_state(model, optimizer)
    if rt.main:
        with atomic_directory(directory, force=True) as tmp:
            write_checkpoint(tmp, config, model_state, carried_from)
            tensors, groups = flatten_optimizer_state(optim_state)
            write_state(tmp, tensors, base="optimizer")
            state = {**trainer_state, "param_groups": groups}
            (tmp / STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")
    rt.barrier()


def save_final(model: Llava, rt: Runtime, output: Path, config: LlavaConfig, carried_from: Path) -> None:
    """The trained model itself in ``output`` (beside ``log.jsonl`` and ``checkpoint-*``), written completely in a
    temporary folder first, then put in place of the model already there (:func:`replace_model`)."""
    model_state, _ = gather_state(model, None)
    if rt.main:
        with temporary_folder(output / "model") as new:
            write_checkpoint(new, config, model_state, carried_from)
            replace_model(output, new)
    rt.barrier()


def model_files(directory: Path) -> list[Path]:
    """The files of the model in ``directory``, ``config.json`` first: its config, weights and carried files."""
    names = ["config.json", *sorted(p.name for p in directory.glob("model*.safetensors*")), *CARRIED_FILES]
    return [directory / name for name in dict.fromkeys(names) if (directory / name).is_file()]


def replace_model(output: Path, new: Path) -> None:
    """Move the model in ``new`` into ``output`` in place of the one there; nothing else in ``output`` changes.

    The old ``config.json`` leaves first and the new one arrives last, so ``output`` always holds the old model,
    the new one, or no ``config.json`` (which every reader refuses), never a config with missing or foreign
    weights. If a move fails, the old model is put back.
    """
    old = make_temp_folder(output / "model", suffix=".old")
    moved_out: list[str] = []
    moved_in: list[str] = []
    try:
        for path in model_files(output):
            os.replace(path, old / path.name)
            moved_out.append(path.name)
        incoming = model_files(new)
        for path in incoming[1:] + incoming[:1]:
            os.replace(path, output / path.name)
            moved_in.append(path.name)
    except BaseException as failure:
        try:
            for name in reversed(moved_in):
                os.replace(output / name, new / name)
            for name in reversed(moved_out):
                os.replace(old / name, output / name)
        except OSError:
            (old / TEMP_MARKER).unlink(missing_ok=True)  # it holds the only copy of the old model: keep it
            raise OSError(
                f"{output}: writing the trained model failed ({failure}), and so did putting the old one back; "
                f"its files are in {old}"
            ) from failure
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def check_fresh_output(output: Path, force: bool) -> None:
    """Refuse, for a new run, an ``output`` that holds another run's files, unless ``force``: the runs would mix, and
    a later ``--resume`` could pick up the other run's checkpoint. (Killed runs' temporary folders do not count.)"""
    if not output.is_dir():
        return
    held = sorted(p.name for p in output.iterdir() if not (p.name.startswith(".") and (p / TEMP_MARKER).is_file()))
    if held and not force:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise FileExistsError(
            f"{output} holds another run ({shown}); a new run there would mix with it. Continue that run with "
            "--resume, choose another --output, or pass --force to start over there"
        )


def clear_earlier_run(output: Path) -> None:
    """Remove another run's checkpoints from ``output`` (``--force``); its log starts over and its model is replaced
    when this run saves its own. Files of other programs stay."""
    if not output.is_dir():
        return
    remove_stale_folders(output)
    for path in output.glob("checkpoint-*"):
        if (path / STATE_NAME).is_file():
            shutil.rmtree(path)


def file_digest(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def run_record(cfg: TrainConfig, data_sha256: str) -> dict[str, Any]:
    """What a checkpoint records of the run it belongs to: its data (by content) and :data:`RUN_FIELDS`."""
    settings = dataclasses.asdict(cfg)
    return {"data": str(cfg.data), "data_sha256": data_sha256, **{name: settings[name] for name in RUN_FIELDS}}


def check_same_run(directory: Path, state: dict[str, Any], run: dict[str, Any]) -> None:
    """Refuse to resume from ``directory`` when its trainer ``state`` belongs to another run than ``run``.

    Checkpoints written before runs were recorded are compared on the settings their config holds."""
    recorded = state.get("run") or {k: v for k, v in (state.get("config") or {}).items() if k in RUN_FIELDS}
    differences = []
    if recorded.get("data_sha256", run["data_sha256"]) != run["data_sha256"]:
        differences.append(f"the data file ({run['data']}) differs from the one it was trained on")
    differences += [
        f"{name} {recorded[name]} there, {run[name]} here"
        for name in RUN_FIELDS
        if name in recorded and recorded[name] != run[name]
    ]
    if differences:
        raise ValueError(
            f"{directory} belongs to another run: {'; '.join(differences)}. Resume it with that run's data and "
            "settings, or start a new run (another --output, or --force)"
        )


def find_checkpoint(resume: str, output: Path) -> Path:
    """``--resume`` with a path, or ``latest``: the highest ``checkpoint-N`` under ``output``."""
    if resume != "latest":
        path = Path(resume)
        if not (path / STATE_NAME).is_file():
            raise FileNotFoundError(f"{path}: not a training checkpoint (no {STATE_NAME})")
        return path
    found = [
        (int(m.group(1)), p) for p in output.glob("checkpoint-*") if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))
    ]
    found = [(n, p) for n, p in found if (p / STATE_NAME).is_file()]
    if not found:
        raise FileNotFoundError(f"{output}: no checkpoint-N directory to resume from")
    return max(found)[1]


def last_checkpoint(output: Path) -> Path | None:
    """The latest resumable checkpoint under ``output``, if any (named in error messages)."""
    try:
        return find_checkpoint("latest", output)
    except FileNotFoundError:
        return None


def read_trainer_state(directory: Path, global_batch: int) -> dict[str, Any]:
    """The trainer state of a checkpoint, checked against this run's global batch."""
    state = read_json(directory / STATE_NAME)
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{directory / STATE_NAME}: not a minillava trainer state")
    if state["global_batch"] != global_batch:
        raise ValueError(
            f"{directory}: written with a global batch of {state['global_batch']} samples, this run has "
            f"{global_batch} (batch size x grad accumulation x processes); resume with the same global batch"
        )
    return state


def restore_optimizer(
    model: Llava, optimizer: torch.optim.Optimizer, directory: Path, state: dict[str, Any], rt: Runtime
) -> None:
    """Load the AdamW state of a checkpoint (read on rank 0, broadcast to the others)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    full = read_optimizer_state(directory, state["param_groups"]) if rt.main else {}
    set_optimizer_state_dict(
        model,
        optimizer,
        optim_state_dict=full,
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=rt.distributed),
    )
