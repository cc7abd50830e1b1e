"""``torchrun --nproc_per_node=N -m tinyskip.training.fsdp_check SETTINGS.json``: a few
LayerSkip training steps of a randomly initialised model sharded with FSDP over the N
processes (the GPU check's FSDP row, analysis/gpu_check.py), on one batch of random
tokens learnt step after step, so it needs no data. Rank 0 prints one JSON line: the losses, seconds per step after the first,
tokens/s over the global batch, and the peak memory a GPU held.

SETTINGS: {"model": {ModelConfig fields}, "train": {TrainConfig fields}, "steps": n,
"device": "cuda" | "cpu"}; ``train.parallel`` is fsdp whatever it says.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.distributed as dist

from ..config import ModelConfig, TrainConfig
from ..model.transformer import Transformer
from .distributed import init_distributed, launched_world
from .optim import make_optimizer
from .sharding import shard
from .trainer import ExitObjective, train_step


def run(settings: dict) -> dict:
    device = torch.device(settings["device"])
    tc = TrainConfig(**{**settings["train"], "parallel": "fsdp"})
    cfg = ModelConfig(**settings["model"])
    world = launched_world(tc)
    rank, _ = init_distributed(device, group=True)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(tc.seed)                     # the same initial weights on every rank
    model = Transformer(cfg).to(device).train()
    objective = ExitObjective(model, tc)
    shard(objective, model.layers, tc)
    optimizer = make_optimizer(model, tc)          # after sharding: it steps the shards
    rows = slice(rank, None, world)
    # One global batch, the same on every rank (each keeps its rows), at every step: its
    # loss must fall as the sharded weights learn it.
    g = torch.Generator().manual_seed(tc.seed)
    tokens = torch.randint(0, cfg.vocab_size, (tc.batch_size, tc.seq_len + 1), generator=g)
    x, y = tokens[rows, :-1].to(device), tokens[rows, 1:].to(device)
    losses, times = [], []
    for step in range(settings["steps"]):
        t0 = time.perf_counter()
        work = train_step(objective, optimizer, tc, x, y, step, rows, rank)
        loss = work.loss.clone()
        dist.all_reduce(loss)                     # (also waits for the step on every rank)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item() / world)
    timed = times[1:] or times                    # the first step builds and warms
    step_s = sum(timed) / len(timed)
    result = {"world": world, "device": device.type, "losses": losses, "step_s": step_s,
              "tokens_per_s": tc.batch_size * tc.seq_len / step_s,
              # (a sharded parameter is a DTensor: its numel is the whole weight's)
              "parameters": sum(p.numel() for p in model.parameters()),
              "peak_gb": (torch.cuda.max_memory_allocated(device) / 1e9
                          if device.type == "cuda" else None)}
    dist.destroy_process_group()
    return result if rank == 0 else {}


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: torchrun --nproc_per_node=N -m tinyskip.training.fsdp_check SETTINGS.json")
    with open(sys.argv[1], encoding="utf-8") as f:
        result = run(json.load(f))
    if result:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
