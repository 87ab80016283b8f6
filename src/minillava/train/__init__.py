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

The package: :mod:`~minillava.train.config` (the run's settings and command line),
:mod:`~minillava.train.loop`, :mod:`~minillava.train.distributed` (processes, FSDP2) and
:mod:`~minillava.train.checkpoints` (saving and resuming).

Multi-process: ``torchrun --nproc_per_node N -m minillava.train ...`` shards the model with FSDP2
(``fully_shard`` on each decoder block, on the tower and on the root) and the data with a
``DistributedSampler``; the backend is nccl on GPUs and gloo on CPU. Checkpoints gather a full state
dict on rank 0 and are plain minillava directories (``minillava.load`` reads them) with the optimizer
state beside the weights (``optimizer.safetensors``) for ``--resume``.
"""

from .config import STAGES, TrainConfig, parse_args, stage_template
from .distributed import PeerFailed, with_dummy_image
from .loop import NonFiniteLoss, lr_at, main, set_trainable, train

__all__ = [
    "STAGES",
    "NonFiniteLoss",
    "PeerFailed",
    "TrainConfig",
    "lr_at",
    "main",
    "parse_args",
    "set_trainable",
    "stage_template",
    "train",
    "with_dummy_image",
]
