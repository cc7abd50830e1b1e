"""Data parallelism for both training loops: the process group under ``torchrun`` and the
mean of a value over the ranks."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); under torchrun, one process group over the chosen device type."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            # Each rank owns one GPU: NCCL and every later .cuda() use the current device.
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def rank_mean(t: torch.Tensor, world: int) -> torch.Tensor:
    """The mean of ``t`` over the ranks (every rank must call it): rank means over
    equal-sized shards average to the global batch's. ``t`` lives on the training device
    (NCCL reduces CUDA tensors only)."""
    if world > 1:
        dist.all_reduce(t)
        t /= world
    return t
