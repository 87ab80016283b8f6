"""The training loop: data in global batches, gradient accumulation, the optimizer step, logging, checkpoints.

See :mod:`minillava.train` for the stages, the loss and the multi-process setup.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, DistributedSampler

from ..checkpoint import load, load_config
from ..data import Collator, LlavaDataset, group_by_length
from ..folders import refuse_overlap
from ..hub import resolve
from ..layouts.source import build_empty
from ..model import IGNORE_INDEX, Llava
from ..processor import load_processor
from ..progress import ProgressBar
from .checkpoints import (
    LOG_NAME,
    STATE_FORMAT,
    STATE_NAME,
    check_fresh_output,
    check_same_run,
    clear_earlier_run,
    file_digest,
    find_checkpoint,
    last_checkpoint,
    read_trainer_state,
    restore_optimizer,
    run_record,
    save_checkpoint,
    save_final,
)
from .config import STAGES, TrainConfig, parse_args, resolve_precision, stage_template
from .distributed import PeerFailed, Runtime, setup_runtime, shard_and_fill, with_dummy_image
from .evaluate import evaluate, summed_loss
from .interrupt import StopRequest, ignore_sigint, interrupted_message

EVAL_NAME = "eval.jsonl"


class NonFiniteLoss(FloatingPointError):
    """The loss (or gradient norm) became NaN or infinite; the run stops before the weights change."""


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


def build_model(source: Path, cfg: TrainConfig, rt: Runtime) -> Llava:
    """fp32 master weights, frozen for the stage, sharded with FSDP2 when there are several processes.

    With several processes only rank 0 reads the weights: every rank builds the model on the meta device and
    :func:`~minillava.train.distributed.shard_and_fill` gives it its shards.
    """
    if rt.distributed:
        model = build_empty(load_config(source))
    else:
        model = load(source, dtype=torch.float32, device=rt.device)
    set_trainable(model, cfg.stage, cfg.train_vision)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    if rt.distributed:
        shard_and_fill(model, source, rt)
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


# --- the loop ---


def start_log(path: Path, resumed_at: int | None) -> None:
    """A fresh run starts a fresh ``log.jsonl``; a resumed one keeps the records up to its checkpoint's step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        return
    lines = path.read_text().splitlines() if resumed_at is not None else []
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= resumed_at]
    path.write_text("".join(line + "\n" for line in kept))


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
        total = summed_loss(model, b, autocast, device)
        if total.requires_grad:  # a text-only micro-batch in stage 1 reaches nothing that trains
            (total * scale).backward()
        loss_sum += total.detach().double()
        del total
    return float(loss_sum)


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the gradients' global norm to ``max_norm``; returns the norm before clipping (what the log shows)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    return float(norm)


def train(cfg: TrainConfig | dict[str, Any]) -> dict[str, Any]:
    """Run a training job; returns ``{"losses": [...], "steps": int, "output": str, "skipped": int}`` (and
    ``"interrupted": True`` when Ctrl-C stopped it after saving a checkpoint).

    ``losses`` are this run's per-step losses (global mean over supervised tokens). Raises
    :class:`NonFiniteLoss` with the step number when the loss or gradient norm stops being finite;
    the checkpoints written before survive.
    """
    if isinstance(cfg, dict):
        cfg = TrainConfig(**cfg)
    rt = setup_runtime()
    try:
        with StopRequest() as stop:
            return _train(cfg, rt, stop)
    finally:
        rt.close()


def _train(cfg: TrainConfig, rt: Runtime, stop: StopRequest) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    output = Path(cfg.output)
    refuse_overlap(output, Path(cfg.model), "--output ", "--model ")
    resume_dir = find_checkpoint(cfg.resume, output) if cfg.resume else None
    if resume_dir is None:
        check_fresh_output(output, cfg.force)
    source = resume_dir or resolve(cfg.model)  # any layout minillava loads, or a hub id

    config = load_config(source)
    template = cfg.template or stage_template(cfg.stage, config.chat_template)
    processor = load_processor(source, image_mode=cfg.image_mode, template=template)
    config.image = processor.image_config
    config.chat_template = processor.template.name  # what the trained model now expects
    read = functools.partial(
        LlavaDataset,
        image_folder=cfg.image_folder,
        processor=processor,
        template=template,
        max_length=cfg.max_length,
        skip_bad_samples=cfg.skip_bad_samples,
    )
    dataset = read(cfg.data, refuse_long=cfg.refuse_long)
    eval_set = read(cfg.eval_data) if cfg.eval_data else None
    pad_id = processor.pad_token_id
    collator = Collator(pad_id)
    sampler = DistributedSampler(dataset, num_replicas=rt.world, rank=rt.rank, shuffle=True, seed=cfg.seed)
    per_rank = len(sampler)
    micro_per_epoch = math.ceil(per_rank / cfg.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)
    global_batch = cfg.batch_size * cfg.grad_accum * rt.world
    run = run_record(cfg, file_digest(cfg.data))
    if resume_dir is not None:
        state = read_trainer_state(resume_dir, global_batch)
        check_same_run(resume_dir, state, run)

    model = build_model(source, cfg, rt)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    step, epoch, epoch_samples = 0, 0, 0
    if resume_dir is not None:
        restore_optimizer(model, optimizer, resume_dir, state, rt)
        step, epoch, epoch_samples = state["step"], state["epoch"], state["epoch_samples"]
    log_path, eval_path = output / LOG_NAME, output / EVAL_NAME
    if rt.main:
        if resume_dir is None:
            clear_earlier_run(output)  # only now that data and model are known to load
        for path in (log_path, eval_path):
            start_log(path, resumed_at=step if resume_dir is not None else None)
    progress = ProgressBar(cfg.log_every, cfg.progress and rt.main, first=step)
    precision = resolve_precision(cfg.precision, rt.device.type)
    autocast = torch.autocast(device_type=rt.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    trainable = [p for p in model.parameters() if p.requires_grad]
    losses: list[float] = []
    smoothed: float | None = None
    skipped_total = dataset.skipped_at_start
    evaluated_at = -1

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
            "run": run,
        }

    def save_now() -> Path:
        path = output / f"checkpoint-{step}"
        save_checkpoint(model, optimizer, rt, path, config, source, trainer_state())
        return path

    def run_eval() -> None:
        nonlocal evaluated_at
        result = evaluate(model, eval_set, cfg.batch_size, autocast, rt.device, exact_match=not rt.distributed)
        evaluated_at = step
        if rt.main:
            progress.note(f"step {step}: {result.summary()}")
            record = {"step": step, "loss": result.loss, "tokens": result.tokens, "exact": result.exact}
            with eval_path.open("a") as f:
                f.write(json.dumps({**record, "short_answers": result.short, "time": time.time()}) + "\n")

    skipped_in_a_row = 0
    while step < total_steps:
        # A pass from the start of the data that makes no step would be followed by another just like it.
        whole_pass, steps_before, skipped_in_pass = epoch_samples == 0, step, 0
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
                worker_init_fn=ignore_sigint if cfg.num_workers else None,
            )
        )
        while step < total_steps:
            started = time.monotonic()
            micro, error = next_micro_batches(loader, cfg.grad_accum)
            consumed = min(remaining, cfg.batch_size * len(micro))
            remaining -= consumed
            # One all-reduce carries what every process must agree on before any forward pass.
            counts = [0.0, 0.0, 0.0, 1.0 if error else 0.0, float(len(micro)), float(stop.requested)]
            for b in micro:
                counts[0] += int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
                counts[1] += int(b["attention_mask"].sum())
                counts[2] += b["skipped"]
            supervised, tokens, skipped, failed, n_micro, stopping = rt.all_sum(counts)
            if failed:
                if error is not None:
                    raise error
                raise PeerFailed("stopping: another process failed to load its data (its error is above)")
            if stopping:  # Ctrl-C on some process: save where the last step left off (this batch is not used)
                path = output / f"checkpoint-{step}"
                if step and not (path / STATE_NAME).is_file():
                    save_now()
                if rt.main:
                    progress.note(interrupted_message(step, path))
                result = {"losses": losses, "steps": step, "output": str(output), "skipped": skipped_total}
                return {**result, "interrupted": True}
            if n_micro == 0:  # the end of the epoch
                if whole_pass and step == steps_before:
                    raise ValueError(
                        f"a whole pass over {cfg.data} gave no step: {skipped_in_pass} bad sample(s) skipped, and no "
                        "batch had a supervised token; fix the data (or --max-length, --image-folder)"
                    )
                epoch, epoch_samples = epoch + 1, 0
                break
            epoch_samples += consumed * rt.world
            skipped_total += int(skipped)
            skipped_in_pass += int(skipped)
            if supervised == 0:
                print(f"step {step + 1}: no supervised token in the global batch; skipped", file=sys.stderr)
                skipped_in_a_row += 1
                if skipped_in_a_row >= cfg.max_skipped_steps:
                    raise ValueError(
                        f"{skipped_in_a_row} steps in a row had no supervised token ({skipped_in_pass} bad sample(s) "
                        f"skipped in this pass over {cfg.data}); stopping. Fix the data, or raise "
                        "--max-skipped-steps if long stretches of it are bad"
                    )
                continue
            skipped_in_a_row = 0
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
            grad_norm = clip_gradients(trainable, cfg.max_grad_norm)
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
            tokens_per_s = tokens / max(time.monotonic() - started, 1e-9)
            if rt.main:
                record = {
                    "step": step,
                    "epoch": epoch,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": int(tokens),
                    "supervised_tokens": int(supervised),
                    "tokens_per_s": tokens_per_s,
                    "skipped": int(skipped),
                    "time": time.time(),
                }
                with log_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            smoothed = loss if smoothed is None else 0.9 * smoothed + 0.1 * loss
            progress.update(
                step,
                total_steps,
                f"steps | loss {loss:.4f} (smoothed {smoothed:.4f}) | lr {lr:.3g} | {tokens_per_s:,.0f} tok/s",
            )
            if cfg.save_every and step % cfg.save_every == 0:
                save_now()
            if eval_set is not None and cfg.eval_every and step % cfg.eval_every == 0:
                run_eval()

    if eval_set is not None and evaluated_at != step:
        run_eval()
    save_final(model, rt, output, config, source)
    if rt.main and skipped_total:
        print(f"skipped {skipped_total} bad sample(s) in all", file=sys.stderr)
    return {"losses": losses, "steps": step, "output": str(output), "skipped": skipped_total}


# --- command line ---


def main(argv: list[str] | None = None) -> int:
    """``minillava train ...`` / ``python -m minillava.train ...``; returns the exit status."""
    try:
        cfg = parse_args(argv)
        result = train(cfg)
    except KeyboardInterrupt:
        print("\nstopped without saving", file=sys.stderr)
        return 130
    except (ValueError, OSError, FloatingPointError, PeerFailed, ImportError) as err:
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
        print(f"{prefix}error: {err}", file=sys.stderr)
        return 1
    if result.get("interrupted"):
        return 130
    if result["losses"] and os.environ.get("RANK", "0") == "0":
        print(f"trained {result['steps']} steps; final loss {result['losses'][-1]:.4f}; model in {result['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
