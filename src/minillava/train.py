"""Training: LLaVA-1.5's two stages, on one process or many (``torchrun`` + FSDP2).

Stages (original LLaVA's ``scripts/v1_5/pretrain.sh`` and ``finetune.sh``):

- ``pretrain``: only the projector trains; template ``plain`` (the caption after the image is supervised);
  lr 1e-3.
- ``finetune``: projector and decoder train; the CLIP tower is frozen and runs under ``no_grad``; template
  ``vicuna_v1`` (or the checkpoint's); lr 2e-5. ``--train-vision`` unfreezes the tower in either stage.

Freezing only flips ``requires_grad``: no weight is copied. The optimizer is AdamW on fp32 master weights;
``--precision bf16`` (default) runs forward and backward under bf16 autocast. The schedule is linear warmup
then cosine to zero, step for step the one of transformers' ``get_cosine_schedule_with_warmup`` that
LLaVA's trainer uses.

The loss of one optimizer step is the sum of the token losses over every supervised token of the
global batch (all processes, all accumulation micro-batches) divided by their total count: the same
number whether the batch is split over 1 process or N, or over accumulation steps. (A per-process mean
averaged over processes would weight tokens unequally.) ``model(...).loss`` stays the plain mean.

Multi-process: ``torchrun --nproc_per_node N -m minillava.train ...`` shards the model with FSDP2
(``fully_shard`` on each decoder block, on the tower and on the root) and the data with a
``DistributedSampler``; the backend is nccl on GPUs and gloo on CPU. Checkpoints gather a full state
dict on rank 0 and are plain minillava directories (``minillava.load`` reads them) with the optimizer
state beside the weights (``optimizer.safetensors``) for ``--resume``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, DistributedSampler

from .anyres import num_tiles
from .chat import TEMPLATES
from .checkpoint import atomic_directory, build_empty, iter_safetensors, load, safetensors_files, write_state
from .config import LlavaConfig
from .data import Collator, LlavaDataset, group_by_length
from .labels import IGNORE_INDEX
from .model import Llava
from .processor import load_processor

STAGES = ("pretrain", "finetune")
STAGE_LR = {"pretrain": 1e-3, "finetune": 2e-5}
CARRIED_FILES = (
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
)
STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
STATE_FORMAT = "minillava-trainer"


class NonFiniteLoss(FloatingPointError):
    """The loss (or gradient norm) became NaN or infinite; the run stops before the weights change."""


class PeerFailed(RuntimeError):
    """Another process of the run stopped with an error; this one stops too instead of waiting for it."""


@dataclass
class TrainConfig:
    """Everything a run needs; the CLI flags map one to one (``--batch-size`` -> ``batch_size``)."""

    model: str
    data: str
    output: str
    image_folder: str | None = None
    stage: str = "finetune"
    train_vision: bool = False
    template: str | None = None
    image_mode: str | None = None
    lr: float | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    max_length: int | None = 2048
    refuse_long: bool = False
    precision: str = "bf16"
    activation_checkpointing: bool = False
    save_every: int = 0
    resume: str | None = None
    seed: int = 0
    skip_bad_samples: bool = False
    log_every: int = 1
    num_workers: int = 0
    group_by_length: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision must be bf16 or fp32, got {self.precision!r}")
        for name in ("batch_size", "grad_accum", "epochs", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        if self.lr is None:
            self.lr = STAGE_LR[self.stage]


# --- the loss ---


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(sum of next-token cross-entropies in fp32, number of supervised tokens)``.

    Logits at t predict labels at t+1; ``-100`` is ignored. ``sum / count`` is ``model(...).loss``.
    """
    targets = labels[:, 1:].to(logits.device)
    total = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total, int((targets != IGNORE_INDEX).sum())


def stage_template(stage: str, recorded: str | None) -> str:
    """The default chat template of a stage: ``plain`` for pretrain; for finetune the checkpoint's recorded
    conversation template, else ``vicuna_v1`` (LLaVA-1.5's stage 2). ``plain`` and ``llava_hf`` are not
    kept for finetuning: they have no end-of-turn token to supervise, so the model would not learn to stop."""
    if stage == "pretrain":
        return "plain"
    if recorded in TEMPLATES and TEMPLATES[recorded].layout in ("two", "llama_2", "mpt"):
        return recorded
    return "vicuna_v1"


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup from 0, then cosine to 0."""
    if step < warmup_steps:
        return base_lr * step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


# --- stages: what trains ---


def set_trainable(model: Llava, stage: str, train_vision: bool = False) -> list[str]:
    """Freeze for ``stage`` by flipping ``requires_grad`` (weights are never copied); returns what trains.

    A frozen tower also runs under ``no_grad``, so none of its activations are kept for backward.
    Tower layers past the deepest selected feature layer (and ``post_layernorm``) never run, so they stay
    frozen even with ``train_vision``.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    if model.image_newline is not None:  # LLaVA-1.6's row end: part of the image-to-text connector
        model.image_newline.requires_grad_(True)
    if stage == "finetune":
        model.llm.requires_grad_(True)
    if train_vision:
        n_states = model.config.vision.num_layers + 1
        deepest = max(i % n_states for i in model.config.feature_layers)
        model.vision.embeddings.requires_grad_(True)
        model.vision.pre_layrnorm.requires_grad_(True)
        for layer in model.vision.encoder.layers[:deepest]:
            layer.requires_grad_(True)
    elif "forward" not in vars(model.vision):
        # An instance attribute, so the class (and FSDP's hooks around __call__) stay as they are.
        model.vision.forward = torch.no_grad()(model.vision.forward)
    return [name for name, p in model.named_parameters() if p.requires_grad]


def enable_activation_checkpointing(model: Llava) -> None:
    """Recompute each decoder block in backward instead of keeping its activations."""
    for block in model.llm.layers:
        if "forward" not in vars(block):
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


# --- processes ---


@dataclass
class Runtime:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum numbers over processes (float64)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.distributed:
            dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def setup_runtime() -> Runtime:
    """One process, or a torchrun process group: nccl on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        return Runtime(dist.get_rank(), dist.get_world_size(), device)
    return Runtime(0, 1, torch.device("cuda" if cuda else "cpu"))


def build_model(source: Path, cfg: TrainConfig, rt: Runtime) -> Llava:
    """Load fp32 master weights, freeze for the stage, and shard with FSDP2 when there are several processes.

    With several processes only rank 0 reads the weights: every rank builds the model on the meta device,
    shards it, allocates its own shards, and receives them from rank 0.
    """
    if not rt.distributed:
        model = load(source, dtype=torch.float32, device=rt.device)
        set_trainable(model, cfg.stage, cfg.train_vision)
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(model)
        return model.train()

    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = build_empty(LlavaConfig.load(source))
    set_trainable(model, cfg.stage, cfg.train_vision)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    mesh = init_device_mesh(rt.device.type, (rt.world,))
    for block in model.llm.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model.vision, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device=rt.device)
    full = {}
    if rt.main:
        full = {name: t.float() for name, t in iter_safetensors(safetensors_files(source))}
    set_model_state_dict(
        model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    )
    model.llm.rotary.reset_buffers(rt.device)  # not in checkpoints; to_empty left it uninitialised
    return model.train()


def build_optimizer(model: Llava, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (transformers' Trainer defaults); biases and norm weights get no weight decay."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for _, p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


# --- batches ---


def with_dummy_image(batch: dict[str, Any], config: LlavaConfig, pad_token_id: int) -> dict[str, Any]:
    """Give an image-less micro-batch one zero image, placed in the padding where nothing can see it.

    With FSDP every process must run the same sharded modules in the same order; a process whose
    micro-batch has no image would skip the tower and the others would wait forever (original LLaVA
    feeds zero images to text-only samples for the same reason). The K placeholders go after the last
    column of row 0 with attention mask 0 and label -100: no real token attends to them and no loss
    reads them, so the loss and the gradients are unchanged (the projector's gradient from them is 0).
    """
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    if ids.shape[0] == 0:  # every sample of this micro-batch was skipped
        ids = torch.full((1, 1), pad_token_id, dtype=torch.long)
        labels = torch.full((1, 1), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((1, 1), dtype=torch.long)
    size = config.vision.image_size
    image: dict[str, Any] = {"pixel_values": torch.zeros((1, config.vision.num_channels, size, size))}
    k = config.num_image_tokens
    if config.image.mode == "anyres":  # the same path as real images, image_newline included
        tiles = num_tiles(size, size, config.anyres.grid_pinpoints, size)
        k = config.anyres_token_count(size, size)
        image = {
            "pixel_values": torch.zeros((1, tiles, config.vision.num_channels, size, size)),
            "image_sizes": torch.tensor([[size, size]]),
        }
    extra_ids = torch.full((ids.shape[0], k), pad_token_id, dtype=torch.long)
    extra_ids[0] = config.image_token_id
    return {
        **batch,
        "input_ids": torch.cat([ids, extra_ids], dim=1),
        "labels": F.pad(labels, (0, k), value=IGNORE_INDEX),
        "attention_mask": F.pad(mask, (0, k), value=0),
        **image,
    }


# --- checkpoints ---


def write_model_files(
    directory: Path, state: dict[str, torch.Tensor], config: LlavaConfig, carried_from: Path | None
) -> None:
    """A minillava checkpoint: ``config.json``, safetensors weights and the tokenizer files."""
    config.save(directory)
    write_state(directory, state)
    if carried_from is not None:
        for name in CARRIED_FILES:
            if (carried_from / name).is_file():
                shutil.copy2(carried_from / name, directory / name)


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
            write_model_files(tmp, model_state, config, carried_from)
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
            write_model_files(tmp, model_state, config, carried_from)
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


# --- the loop ---


class Progress:
    """One status line on stderr (rewritten in place on a terminal, one line per ``every`` steps otherwise)."""

    def __init__(self, total: int, every: int, enabled: bool) -> None:
        self.total, self.every, self.enabled = total, every, enabled
        self.tty = sys.stderr.isatty()
        self.start = time.monotonic()
        self.last_width = 0

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if not self.enabled or (not self.tty and step % self.every and step != self.total):
            return
        width = 24
        done = int(width * step / self.total)
        line = (
            f"[{'#' * done}{'.' * (width - done)}] step {step}/{self.total} | loss {loss:.4f} | lr {lr:.3g} | "
            f"{tokens_per_s:,.0f} tok/s | {time.monotonic() - self.start:.0f}s"
        )
        end = "" if self.tty and step != self.total else "\n"
        padded, self.last_width = line.ljust(self.last_width), len(line)  # overwrite a longer previous line
        print(("\r" if self.tty else "") + padded, end=end, file=sys.stderr, flush=True)


def next_micro_batches(loader, n: int) -> tuple[list[dict[str, Any]], Exception | None]:
    """Up to ``n`` batches (fewer at the end of the epoch) and the data error that stopped them, if any."""
    micro: list[dict[str, Any]] = []
    try:
        for _ in range(n):
            batch = next(loader, None)
            if batch is None:
                break
            micro.append(batch)
    except (ValueError, OSError) as err:
        return micro, err
    return micro, None


def accumulate_gradients(
    model: Llava, micro: list[dict[str, Any]], scale: float, autocast, device: torch.device
) -> float:
    """Forward and backward each micro-batch with its loss sum times ``scale``; returns the summed token loss."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for b in micro:
        if b["input_ids"].shape[0] == 0:
            continue  # every sample skipped (one process only; with several the dummy row is there)
        pixels = b["pixel_values"]
        with autocast:
            logits = model(
                b["input_ids"].to(device),
                None if pixels is None else pixels.to(device),
                b["attention_mask"].to(device),
                image_sizes=b.get("image_sizes"),
            ).logits
        total, _ = token_loss_sum(logits, b["labels"])
        if total.requires_grad:  # a text-only micro-batch in stage 1 reaches nothing that trains
            (total * scale).backward()
        loss_sum += total.detach().double()
        del logits, total
    return float(loss_sum)


def train(cfg: TrainConfig | dict[str, Any]) -> dict[str, Any]:
    """Run a training job; returns ``{"losses": [...], "steps": int, "output": str, "skipped": int}``.

    ``losses`` are this run's per-step losses (global mean over supervised tokens). Raises
    :class:`NonFiniteLoss` with the step number when the loss or gradient norm stops being finite;
    the checkpoints written before survive.
    """
    if isinstance(cfg, dict):
        cfg = TrainConfig(**cfg)
    rt = setup_runtime()
    try:
        return _train(cfg, rt)
    finally:
        if rt.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, rt: Runtime) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    output = Path(cfg.output)
    resume_dir = find_checkpoint(cfg.resume, output) if cfg.resume else None
    source = resume_dir or Path(cfg.model)
    state = json.loads((resume_dir / STATE_NAME).read_text()) if resume_dir else None

    config = LlavaConfig.load(source)
    template = cfg.template or stage_template(cfg.stage, config.chat_template)
    processor = load_processor(source, image_mode=cfg.image_mode, template=template)
    config.image = processor.image_config
    config.chat_template = processor.template.name  # what the trained model now expects
    dataset = LlavaDataset(
        cfg.data,
        cfg.image_folder,
        processor,
        template=template,
        max_length=cfg.max_length,
        refuse_long=cfg.refuse_long,
        skip_bad_samples=cfg.skip_bad_samples,
    )
    pad_id = processor.pad_token_id
    collator = Collator(pad_id)
    sampler = DistributedSampler(dataset, num_replicas=rt.world, rank=rt.rank, shuffle=True, seed=cfg.seed)
    per_rank = len(sampler)
    micro_per_epoch = math.ceil(per_rank / cfg.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)
    global_batch = cfg.batch_size * cfg.grad_accum * rt.world

    model = build_model(source, cfg, rt)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    step, epoch, epoch_samples = 0, 0, 0
    if state is not None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"{resume_dir / STATE_NAME}: not a minillava trainer state")
        if state["global_batch"] != global_batch:
            raise ValueError(
                f"{resume_dir}: written with a global batch of {state['global_batch']} samples, this run has "
                f"{global_batch} (batch size x grad accumulation x processes); resume with the same global batch"
            )
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        full = read_optimizer_state(resume_dir, state["param_groups"]) if rt.main or not rt.distributed else {}
        set_optimizer_state_dict(
            model,
            optimizer,
            optim_state_dict=full,
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=rt.distributed),
        )
        step, epoch, epoch_samples = state["step"], state["epoch"], state["epoch_samples"]

    log_path = output / "log.jsonl"
    if rt.main:
        output.mkdir(parents=True, exist_ok=True)
        if log_path.exists():
            # A fresh run starts a fresh log; a resumed one keeps the records up to its checkpoint.
            lines = log_path.read_text().splitlines() if state is not None else []
            kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
            log_path.write_text("".join(line + "\n" for line in kept))
    progress = Progress(total_steps, cfg.log_every, cfg.progress and rt.main)
    autocast = torch.autocast(device_type=rt.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    trainable = [p for p in model.parameters() if p.requires_grad]
    losses: list[float] = []
    skipped_total = dataset.skipped_at_start

    def trainer_state() -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "step": step,
            "epoch": epoch,
            "epoch_samples": epoch_samples,
            "global_batch": global_batch,
            "total_steps": total_steps,
            "world_size": rt.world,
            "config": dataclasses.asdict(cfg),
        }

    while step < total_steps:
        sampler.set_epoch(epoch)
        indices = list(sampler)
        if cfg.group_by_length:
            indices = group_by_length(indices, dataset.lengths, cfg.batch_size, seed=cfg.seed + epoch)
        indices = indices[epoch_samples // rt.world :]
        remaining = len(indices)
        loader = iter(
            DataLoader(
                dataset,
                batch_size=cfg.batch_size,
                sampler=indices,
                collate_fn=collator,
                num_workers=cfg.num_workers,
            )
        )
        while step < total_steps:
            started = time.monotonic()
            micro, error = next_micro_batches(loader, cfg.grad_accum)
            consumed = min(remaining, cfg.batch_size * len(micro))
            remaining -= consumed
            # One all-reduce carries what every process must agree on before any forward pass.
            counts = [0.0, 0.0, 0.0, 1.0 if error else 0.0, float(len(micro))]
            for b in micro:
                counts[0] += int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
                counts[1] += int(b["attention_mask"].sum())
                counts[2] += b["skipped"]
            supervised, tokens, skipped, failed, n_micro = rt.all_sum(counts)
            if failed:
                if error is not None:
                    raise error
                raise PeerFailed("stopping: another process failed to load its data (its error is above)")
            if n_micro == 0:  # the end of the epoch
                epoch, epoch_samples = epoch + 1, 0
                break
            epoch_samples += consumed * rt.world
            skipped_total += int(skipped)
            if supervised == 0:
                print(f"step {step + 1}: no supervised token in the global batch; skipped", file=sys.stderr)
                continue
            if rt.distributed:
                micro = [b if b["pixel_values"] is not None else with_dummy_image(b, config, pad_id) for b in micro]
            # FSDP averages gradients over processes; scaling by world/count turns that into sum/count.
            loss_sum = accumulate_gradients(model, micro, rt.world / supervised, autocast, rt.device)
            loss = rt.all_sum([loss_sum])[0] / supervised
            if not math.isfinite(loss):
                raise NonFiniteLoss(
                    f"the loss is {loss} at step {step + 1}; stopping before the weights change. "
                    f"Last checkpoint: {last_checkpoint(output) or 'none'}. Lower --lr or check the data."
                )
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            grad_norm = float(grad_norm)
            if not math.isfinite(grad_norm):
                raise NonFiniteLoss(
                    f"the gradient norm is {grad_norm} at step {step + 1} (loss {loss:.4f}); stopping before the "
                    f"weights change. Last checkpoint: {last_checkpoint(output) or 'none'}."
                )
            lr = lr_at(step, total_steps, warmup_steps, cfg.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss)
            elapsed = time.monotonic() - started
            if rt.main:
                record = {
                    "step": step,
                    "epoch": epoch,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": int(tokens),
                    "supervised_tokens": int(supervised),
                    "tokens_per_s": tokens / max(elapsed, 1e-9),
                    "skipped": int(skipped),
                    "time": time.time(),
                }
                with log_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            progress.update(step, loss, lr, tokens / max(elapsed, 1e-9))
            if cfg.save_every and step % cfg.save_every == 0:
                save_checkpoint(model, optimizer, rt, output / f"checkpoint-{step}", config, source, trainer_state())

    save_final(model, rt, output, config, source)
    if rt.main and skipped_total:
        print(f"skipped {skipped_total} bad sample(s) in all", file=sys.stderr)
    return {"losses": losses, "steps": step, "output": str(output), "skipped": skipped_total}


def last_checkpoint(output: Path) -> Path | None:
    try:
        return find_checkpoint("latest", output)
    except FileNotFoundError:
        return None


# --- command line ---


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(
        prog="minillava train",
        description="Train LLaVA (stage 1: pretrain the projector; stage 2: finetune projector + decoder). "
        "Multi-process: torchrun --nproc_per_node N -m minillava.train ...",
    )
    p.add_argument("--model", required=True, help="minillava checkpoint directory to start from")
    p.add_argument("--data", required=True, help="LLaVA-format .json (list) or .jsonl file")
    p.add_argument("--image-folder", help="root of the image paths in the data (default: the data file's folder)")
    p.add_argument("--output", required=True, help="directory for the trained model, checkpoints and log.jsonl")
    p.add_argument("--stage", choices=STAGES, default="finetune")
    p.add_argument("--train-vision", action="store_true", help="also train the CLIP tower")
    p.add_argument(
        "--template", help="chat template (default: plain for pretrain; for finetune the checkpoint's, else vicuna_v1)"
    )
    p.add_argument(
        "--image-mode", choices=("crop", "pad", "anyres"), help="image preprocessing (default: the checkpoint's)"
    )
    p.add_argument("--lr", type=float, help="peak learning rate (default: 1e-3 pretrain, 2e-5 finetune)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=4, help="samples per process per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--max-length", type=int, default=2048, help="tokens per sample, image placeholders included")
    p.add_argument("--refuse-long", action="store_true", help="refuse longer samples instead of cutting them")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute decoder blocks in backward")
    p.add_argument("--save-every", type=int, default=0, help="write output/checkpoint-N every N steps (0: never)")
    p.add_argument(
        "--resume", nargs="?", const="latest", help="continue from a checkpoint (default: the latest in --output)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-bad-samples", action="store_true", help="drop unreadable/invalid samples, with a count")
    p.add_argument("--log-every", type=int, default=1, help="progress line every N steps (log.jsonl: every step)")
    p.add_argument("--num-workers", type=int, default=0, help="data loader worker processes")
    p.add_argument(
        "--group-by-length",
        action="store_true",
        help="batch samples of similar length together (less padding, faster); the order stays seeded",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    return TrainConfig(**vars(args))


def main(argv: list[str] | None = None) -> int:
    """``minillava train ...`` / ``python -m minillava.train ...``; returns the exit status."""
    try:
        cfg = parse_args(argv)
        result = train(cfg)
    except (ValueError, OSError, FloatingPointError, PeerFailed) as err:
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
        print(f"{prefix}error: {err}", file=sys.stderr)
        return 1
    if result["losses"] and os.environ.get("RANK", "0") == "0":
        print(f"trained {result['steps']} steps; final loss {result['losses'][-1]:.4f}; model in {result['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
