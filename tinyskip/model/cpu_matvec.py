"""The one-row products of decoding on x86 CPUs, in bf16 and int8: ``cpu_matvec.cpp``,
built on first use with PyTorch's extension builder and kept in its cache
(``TORCH_EXTENSIONS_DIR``, ~/.cache/torch_extensions by default).

Inductor's loop for these products converts each narrow weight to fp32 lane by lane and
stays well below the memory floor (measured on one 1M x 576 weight, 2 threads, this
Xeon: bf16 12.6-14.1 GB/s, int8 10.2-12.7 GB/s, against 21.7-22.6 GB/s for ``torch.sum``
of 1 GiB); the kernels here read 27.4-27.7 GB/s (bf16, 1M x 576) and 25.0-25.4 GB/s
(int8, 2M x 576) where ``torch.sum`` read 24.6-28.0 GB/s in the same run. fp32
products keep inductor's loop, which already runs near the floor; int8 weights with fp32
activations keep theirs too (the kernel rounds activations to int16, which an fp32
model's decoding should not do on some paths and not others).

``enable_for`` builds the kernels for a model whose products they serve; ``linear`` in
kernels.py then sends them calls of up to ``MAX_ROWS`` rows on the CPU (a decoding step,
SSD's verify), eager and compiled, without gradients (the ops have no backward). The choice is per process: once
a model with bf16 or int8 weights decodes, every later one-row product of those dtypes
on the CPU takes the kernels. Where the build fails (no C++ compiler, no ninja), the
CPU is not x86, or it lacks the loops' extensions (AVX-512, with its BF16 extension for
bf16; or AVX2, with FMA for bf16: docs/design.md), nothing changes: products keep their
other paths.
"""

from __future__ import annotations

import hashlib
import os
import platform
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

# The ops and AVX-512 loops, the AVX2 loops, and what they share.
SOURCES = [Path(__file__).with_name(f) for f in ("cpu_matvec.cpp", "cpu_matvec_avx2.cpp")]
HEADER = Path(__file__).with_name("cpu_matvec.h")

# Read by ``takes`` while a graph is traced: set before any step runs (``enable_for``).
_fast: dict[torch.dtype, bool] = {}
_built: Optional[bool] = None


def load() -> bool:
    """Build (the first time, 10-30 s) and load the kernels; False where that fails."""
    global _built
    if _built is None:
        _built = _build()
    return _built


def _build() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        import ninja      # the builder looks for it on PATH, which an unactivated venv lacks
        if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    try:
        from torch.utils import cpp_extension
        # The builder rebuilds when a source or a flag changes, and reads no header: the
        # header's digest goes in as a flag.
        digest = hashlib.sha256(HEADER.read_bytes()).hexdigest()[:16]
        cpp_extension.load(name="tinyskip_cpu_matvec", sources=[str(f) for f in SOURCES],
                           extra_cflags=["-O3", "-fopenmp", f"-DTINYSKIP_MATVEC_H={digest}"],
                           extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as e:   # no compiler, no ninja, ...: the products keep their other paths
        first = str(e).splitlines()[0] if str(e) else ""
        warnings.warn(f"tinyskip's CPU matvec kernels could not be built ({type(e).__name__}: "
                      f"{first}); one-row bf16 and int8 products take their slower paths")
        return False

    # Shapes for tracing: what each op returns, without running it.
    @torch.library.register_fake("tinyskip::matvec_bf16")
    def _(x, w, loop="best"):
        return x.new_empty(*x.shape[:-1], w.shape[0])

    @torch.library.register_fake("tinyskip::matvec_int8")
    def _(x, w, scale, loop="best"):
        return x.new_empty(*x.shape[:-1], w.shape[0])
    return True


def enable_for(model: nn.Module) -> None:
    """Build the kernels and send them ``model``'s one-row products if it decodes on the
    CPU with bf16 or int8 weights and the CPU has a vector loop for them (see above).
    Decoding calls it before its first step."""
    params = list(model.parameters())
    if not params or params[0].device.type != "cpu" or \
            not {p.dtype for p in params} & {torch.bfloat16, torch.int8}:
        return
    if not _fast and load():
        bf16, int8 = torch.ops.tinyskip.loops()
        _fast.update({torch.bfloat16: bf16[0] != "portable", torch.int8: int8[0] != "portable"})


# Rows of x a call of several positions may have: SSD's verify of up to 7 drafts. A
# weight row (the AVX-512 loops: a block of 4) is read from memory once and reused from
# L1 for every row of x, but each row of x is a pass of its own over it: 8 rows of a 49152 x 576 bf16 weight
# took 3.4 times one row's time, ATen's GEMM 3.8 times (one thread, a loaded machine: the
# ratios, not the times), so the kernels stop at 8 rows. The AVX2 loops widen each weight
# row once for up to 4 rows of x: SmolLM2's 211 int8 products of a step with 3 rows of x
# (a verify of 2 drafts) took 1.28 times their time with one row, against 1.94 when every
# row of x widened W again (bf16: 1.02 against 1.18; the AMD EPYC, 2 threads).
# One row per sequence (a decoding step) always goes, whatever the batch.
MAX_ROWS = 8


def takes(x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor]) -> bool:
    """Whether ``matvec`` computes x @ weight.T [* scale]: enabled for weight's dtype, x
    (..., T, in) in bf16 on the CPU with T = 1 or at most ``MAX_ROWS`` rows in all, weight
    contiguous, the scale in x's dtype, no gradient asked for."""
    return _fast.get(weight.dtype, False) and x.device.type == "cpu" and x.dim() > 1 and \
        (x.shape[-2] == 1 or x.numel() <= MAX_ROWS * x.shape[-1]) and \
        x.dtype == torch.bfloat16 and \
        weight.is_contiguous() and (scale is None or scale.dtype == x.dtype) and \
        not torch.is_grad_enabled()


def matvec(x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """x (..., in) @ weight (out, in).T [* scale (out,) for int8] -> (..., out) in x's dtype."""
    if scale is None:
        return torch.ops.tinyskip.matvec_bf16(x, weight)
    return torch.ops.tinyskip.matvec_int8(x, weight, scale)
