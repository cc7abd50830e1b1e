"""What every job needs of the machine: the device, dtypes by name, bf16 autocast, timers."""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import sys
import time

import torch

from .config import ConfigError, TrainConfig, first_line
from .model.kernels import CPU_BF16_GEMM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Weight-only quantisation of a loaded model (model/quantize.py), on top of its dtype.
QUANTIZE = ("none", "int8")


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but CUDA is not available (use auto or cpu)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def check_runs(device: torch.device, dtype: torch.dtype, name: str) -> None:
    """Refuse, in one line, a dtype this device cannot compute in, before a model is
    loaded into it: a small product in that dtype is tried on the device."""
    try:
        a = torch.ones(2, 2, device=device, dtype=dtype)
        (a @ a).sum().item()
    except (RuntimeError, NotImplementedError, TypeError) as e:
        raise ConfigError(f"dtype={name}: this machine's {device.type} cannot compute in it "
                          f"({first_line(e)})") from None


def bf16_native(device: torch.device) -> bool:
    """Whether bf16 matmuls run at full speed on ``device``: a GPU that computes in bf16, or
    a CPU whose bf16 products ATen hands to oneDNN (AVX-512, AMX, Arm's bf16). Elsewhere
    ATen falls back to a scalar loop: 0.43 GFLOP/s against fp32's 93 for a 1024 x 576 x
    8192 product on a 2-core AMD EPYC without AVX-512, where an exit adapter's training
    step under bf16 autocast took 200 s against 11.5 s in fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and CPU_BF16_GEMM


def resolve_bf16(tc: TrainConfig, device: torch.device) -> TrainConfig:
    """``tc`` with ``bf16=None`` (the default) made what ``device`` runs at full speed."""
    return tc if tc.bf16 is not None else dataclasses.replace(tc, bf16=bf16_native(device))


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


def matrix_peak(device: torch.device, dtype: torch.dtype, n_max: int = 2048, reps: int = 5,
                call_s: float = 0.1) -> float:
    """FLOP/s of an n x n x n matrix product in ``dtype`` (ATen's GEMM), median of ``reps``.

    n doubles from 256, stopping at the first product that takes ``call_s`` or more or
    at the first n >= ``n_max``: a product that long runs at the GEMM's full speed, and
    where the GEMM is slow the measurement stays short (bf16 on a CPU without
    AVX512-BF16 ran at 1 GFLOP/s on an AMD EPYC, where ten products of 2048 took three
    minutes)."""
    n = 256
    while True:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        seconds(lambda: a @ b, device)                  # the first call sets the GEMM up
        if n >= n_max or seconds(lambda: a @ b, device) >= call_s:
            return 2 * n ** 3 / median_seconds(lambda: a @ b, reps, device)
        n *= 2

# How often long work reports itself when its output is not a terminal (logs, CI, pipes).
PROGRESS_EVERY_S = 30.0


def progress_bar(iterable=None, *, total=None, desc: str = "", initial: int = 0,
             every: float = PROGRESS_EVERY_S):
    """A progress report for long work: tqdm's bar on a terminal; elsewhere one plain line
    to standard error at most every ``every`` seconds and one at the end (step, rate,
    elapsed, ETA, and what ``set_postfix`` was given), so logs see the work advance."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, initial=initial, dynamic_ncols=True,
                    leave=False)
    return LineProgress(iterable, total=total, desc=desc, initial=initial, every=every)


class LineProgress:
    """The part of tqdm's interface tinyskip uses (iterate, ``update``, ``set_postfix``,
    ``write``, ``close``, a context manager), as plain lines."""

    def __init__(self, iterable=None, total=None, desc: str = "", initial: int = 0,
                 every: float = PROGRESS_EVERY_S):
        self.iterable, self.desc, self.every = iterable, desc, every
        self.total = total if total is not None else (
            len(iterable) if hasattr(iterable, "__len__") else None)
        self.n = self.start = initial
        self.postfix = ""
        self.t0 = self.last = time.monotonic()
        self.reported = None          # the step of the last line printed

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.every:
            self._report()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def write(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.reported != self.n:
            self._report()

    def _report(self) -> None:
        now = time.monotonic()
        elapsed, done = now - self.t0, self.n - self.start
        parts = [f"{self.n}/{self.total}" if self.total else f"{self.n}"]
        if self.postfix:
            parts.append(self.postfix)
        parts.append(f"{_clock(elapsed)} elapsed")
        if self.total and done > 0 and self.n < self.total:
            parts.append(f"ETA {_clock(elapsed / done * (self.total - self.n))}")
        print(f"{self.desc}: " + ", ".join(parts), file=sys.stderr, flush=True)
        self.last, self.reported = now, self.n


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"
