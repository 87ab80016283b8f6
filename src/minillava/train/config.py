"""What a training run needs (:class:`TrainConfig`) and the command line that fills it.

The flags map one to one onto the fields (``--batch-size`` -> ``batch_size``); :func:`parse_args` is the
``minillava train`` / ``python -m minillava.train`` parser.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..chat import TEMPLATES

STAGES = ("pretrain", "finetune")
STAGE_LR = {"pretrain": 1e-3, "finetune": 2e-5}
"""LLaVA-1.5's learning rates (``scripts/v1_5``), set for 7B/13B models with a global batch of 256 (stage 1) and
128 (stage 2); a tiny model trained from scratch needs far more (the bundled one: 1e-3 to 3e-3)."""
PRECISIONS = ("auto", "bf16", "fp32")


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
    precision: str = "auto"
    activation_checkpointing: bool = False
    save_every: int = 0
    resume: str | None = None
    force: bool = False
    seed: int = 0
    skip_bad_samples: bool = False
    max_skipped_steps: int = 100
    log_every: int = 1
    num_workers: int = 0
    group_by_length: bool = False
    progress: bool = True
    eval_data: str | None = None
    eval_every: int = 0

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0: at the end only), got {self.eval_every}")
        for name in ("batch_size", "grad_accum", "epochs", "log_every", "max_skipped_steps"):
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


def resolve_precision(precision: str, device_type: str) -> str:
    """``auto``: bf16 autocast on a GPU; fp32 on the CPU, where bf16 autocast was measured slower on CPUs without
    native bf16 (benchmarks/bench_train_precision.py)."""
    if precision != "auto":
        return precision
    return "bf16" if device_type == "cuda" else "fp32"


def stage_template(stage: str, recorded: str | None) -> str:
    """The default chat template of a stage: ``plain`` for pretrain; for finetune the checkpoint's recorded
    conversation template, else ``vicuna_v1`` (LLaVA-1.5's stage 2). ``plain`` and ``llava_hf`` are not
    kept for finetuning: they have no end-of-turn token to supervise, so the model would not learn to stop."""
    if stage == "pretrain":
        return "plain"
    if recorded in TEMPLATES and TEMPLATES[recorded].layout in ("two", "llama_2", "mpt"):
        return recorded
    return "vicuna_v1"


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(
        prog="minillava train",
        description="Train LLaVA (stage 1: pretrain the projector; stage 2: finetune projector + decoder). "
        "Multi-process: torchrun --nproc_per_node N -m minillava.train ...",
    )
    p.add_argument(
        "--model",
        required=True,
        help="checkpoint to start from: a minillava, llava-hf or original LLaVA directory, or a hub id",
    )
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
    p.add_argument(
        "--lr",
        type=float,
        help="peak learning rate (default: LLaVA-1.5's for 7B/13B, 1e-3 pretrain, 2e-5 finetune; a small model "
        "trained from scratch needs far more, e.g. 1e-3)",
    )
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=4, help="samples per process per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--max-length", type=int, default=2048, help="tokens per sample, image placeholders included")
    p.add_argument("--refuse-long", action="store_true", help="refuse longer samples instead of cutting them")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="bf16 autocast or fp32 (master weights are fp32 either way); auto: bf16 on a GPU, fp32 on the CPU",
    )
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute decoder blocks in backward")
    p.add_argument("--save-every", type=int, default=0, help="write output/checkpoint-N every N steps (0: never)")
    p.add_argument(
        "--resume", nargs="?", const="latest", help="continue from a checkpoint (default: the latest in --output)"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="start a new run in an --output that holds another: its checkpoints and log are removed, its model is "
        "replaced at the end",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-bad-samples", action="store_true", help="drop unreadable/invalid samples, with a count")
    p.add_argument(
        "--max-skipped-steps",
        type=int,
        default=100,
        help="stop after this many steps in a row without a supervised token (every sample bad or cut)",
    )
    p.add_argument("--log-every", type=int, default=1, help="progress line every N steps (log.jsonl: every step)")
    p.add_argument("--num-workers", type=int, default=0, help="data loader worker processes")
    p.add_argument(
        "--group-by-length",
        action="store_true",
        help="batch samples of similar length together (less padding, faster); the order stays seeded",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument(
        "--eval-data",
        metavar="FILE",
        help="held-out samples (LLaVA JSON/JSONL, images under --image-folder): loss, and exact match on short "
        "answers, logged to eval.jsonl",
    )
    p.add_argument("--eval-every", type=int, default=0, metavar="N", help="evaluate every N steps (0: at the end)")
    args = p.parse_args(argv)
    return TrainConfig(**vars(args))
