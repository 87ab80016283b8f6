"""Training checkpoints: the trained model, resumable ``checkpoint-N`` directories, and resuming from them.

Both are plain minillava directories (``minillava.load`` reads them) gathered on rank 0. A resumable one adds the
AdamW state (``optimizer.safetensors``, fp32, keyed by parameter name) and ``trainer_state.json`` (step, epoch,
position in the data, global batch). Every directory is written to a temporary one and renamed when complete.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint import write_checkpoint
from ..config import LlavaConfig, read_json
from ..model import Llava
from ..safetensors_io import atomic_directory
from .distributed import Runtime

STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
STATE_FORMAT = "minillava-trainer"


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
    with safe_open(str(directory / OPTIMIZER_NAME), framework="pt", device="cpu") as f:
        for name in f.keys():
            fqn, key = name.rsplit("::", 1)
            state.setdefault(fqn, {})[key] = f.get_tensor(name)
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
            save_file(tensors, str(tmp / OPTIMIZER_NAME), metadata={"format": "pt"})
            state = {**trainer_state, "param_groups": groups}
            (tmp / STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")
    rt.barrier()


def save_final(model: Llava, rt: Runtime, output: Path, config: LlavaConfig, carried_from: Path) -> None:
    """The trained model itself in ``output`` (beside ``log.jsonl`` and ``checkpoint-*``)."""
    model_state, _ = gather_state(model, None)
    if rt.main:
        with atomic_directory(output / ".final", force=True) as tmp:
            write_checkpoint(tmp, config, model_state, carried_from)
            for old in output.glob("model*.safetensors*"):
                old.unlink()
            for path in tmp.iterdir():
                os.replace(path, output / path.name)
    rt.barrier()


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
