"""The processes of a run: one, or a ``torchrun`` group sharded with FSDP2.

Under ``torchrun`` the backend is nccl on GPUs and gloo on CPU. The model is sharded with ``fully_shard`` on each
decoder block, on the tower and on the root; only rank 0 reads the weights, and the other ranks receive their
shards from it. Every process must run the same sharded modules in the same order, so a micro-batch without
images gets a zero image that nothing can see (:func:`with_dummy_image`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..anyres import num_tiles
from ..checkpoint import load
from ..config import LlavaConfig
from ..model import IGNORE_INDEX, Llava


class PeerFailed(RuntimeError):
    """Another process of the run stopped with an error; this one stops too instead of waiting for it."""


@dataclass
class Runtime:
    """This process's place in the run: its rank, the number of processes and its device."""

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

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


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


def shard_and_fill(model: Llava, source: Path, rt: Runtime) -> None:
    """Shard a meta-device ``model`` with FSDP2 and fill it with the fp32 weights of ``source``, read on rank 0 only.

    Every rank shards the model, allocates its own shards and receives them from rank 0. Freezing and activation
    checkpointing are applied before, so that FSDP sees the final modules.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(rt.device.type, (rt.world,))
    for block in model.llm.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model.vision, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device=rt.device)
    full = {}
    if rt.main:  # any layout minillava loads, mapped to minillava names
        full = load(source, dtype=torch.float32).state_dict()
    set_model_state_dict(
        model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    )
    model.llm.rotary.reset_buffers(rt.device)  # not in checkpoints; to_empty left it uninitialised


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
