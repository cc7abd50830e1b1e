"""Data parallelism for both training loops: the launch checks, the process group under
``torchrun`` and the mean of a value over the ranks."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from ..config import ConfigError, TrainConfig

# What torchrun gives each process, and what a process group is formed from.
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_world(tc: TrainConfig) -> int:
    """The number of processes this job runs on, checked against ``tc`` before any
    process group forms (a refusal is one line, and nothing is written)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tc.parallel == "fsdp" and not all(k in os.environ for k in LAUNCH_ENV):
        raise ConfigError("train.parallel=fsdp shards the model over a process group: launch "
                          "with torchrun --nproc_per_node=N -m tinyskip.train ...")
    if tc.batch_size % world:
        raise ConfigError(f"train.batch_size={tc.batch_size} must be divisible by the "
                          f"{world} data-parallel processes")
    return world


def hold_until_rank_zero_spoke(rank: int) -> bool:
    """Under torchrun, which stops every rank once one exits, a refusing rank other than 0
    waits (about 30 s at most) until rank 0 has printed the refusal: otherwise the faster
    rank exits first and torchrun kills rank 0 before it says why. Rank 0 calls it after
    printing. False where rank 0 never spoke (the refusal was this rank's own), so the
    caller says it. The rendezvous is the key-value store torchrun's agent serves at
    MASTER_ADDR:MASTER_PORT, so it works before (and without) a process group; without
    that agent (a hand-set environment) there is nothing to wait on."""
    if (int(os.environ.get("WORLD_SIZE", "1")) < 2
            or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"):
        return True
    # The agent keeps its store across restarts (--max-restarts): one key per attempt.
    key = f"tinyskip/refusal-printed/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                              is_master=False, timeout=timedelta(seconds=30))
        if rank == 0:
            store.set(key, "1")
        else:
            store.wait([key])
        return True
    except RuntimeError:      # no store to reach, or rank 0 never spoke
        return rank == 0


def init_distributed(device: torch.device, group: bool = False) -> tuple[int, int]:
    """(rank, world size); under torchrun, one process group over the chosen device type
    (with ``group``, also for one process: FSDP shards over a group of one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if (world > 1 or group) and not dist.is_initialized():
        if device.type == "cuda":
            # Each rank owns one GPU: NCCL and every later .cuda() use the current device.
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), world) if world > 1 or group else (0, 1)


def rank_mean(t: torch.Tensor, world: int) -> torch.Tensor:
    """The mean of ``t`` over the ranks (every rank must call it): rank means over
    equal-sized shards average to the global batch's. ``t`` lives on the training device
    (NCCL reduces CUDA tensors only)."""
    if world > 1:
        dist.all_reduce(t)
        t /= world
    return t
