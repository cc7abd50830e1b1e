"""What every job needs of the machine: the device, dtypes by name, bf16 autocast, timers."""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

from .config import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but CUDA is not available (use auto or cpu)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on the model's device type, or nothing."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def seconds(fn, device: torch.device) -> float:
    """Wall time of one ``fn()`` (a GPU is synchronised before the reading)."""
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def median_seconds(fn, reps: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` over ``reps`` calls after 5 warm-up calls."""
    for _ in range(5):
        fn()
    return statistics.median(seconds(fn, device) for _ in range(reps))
