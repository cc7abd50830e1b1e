"""The kernels of a step: products and attention as decoding and training call them.

Compiled one-row calls (a decoding step) on the CPU can write their products and their
attention out as multiply-and-sum, which inductor generates and fuses, instead of calling
ATen's GEMM and SDPA kernels, whose set-up costs more than one token's work at these
sizes; ``Kernels`` says which, and the caller passes it down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_matvec


@dataclass(frozen=True)
class Kernels:
    """How compiled one-row calls (decoding steps) on the CPU write their products
    (``linear``) and their attention (``one_query_attention``): as multiply-and-sum that
    inductor generates and fuses, or tinyskip's own kernels for bf16 and int8 weights
    (True), or as calls to ATen's GEMM and SDPA kernels.
    Callers pass it down through ``run_layers`` / ``head``; it is read while a graph is
    traced, so each choice is its own graph. Decoding always uses ``DECODE_KERNELS``; the
    engine benchmark passes the others to measure what each buys."""

    products_in_graph: bool = True
    attention_in_graph: bool = True


DECODE_KERNELS = Kernels()

# Whether ATen hands bf16 products on the CPU to oneDNN (AVX-512, AMX, Arm's bf16).
# Elsewhere its bf16 GEMM is a scalar loop: 12.5 ms against fp32's 2.1 for 64 rows of a
# 1536 x 576 weight on one core of an AVX2-only AMD EPYC, 200 times fp32's time at
# 1024 x 576 x 8192.
CPU_BF16_GEMM = torch.ops.mkldnn._is_mkldnn_bf16_supported()


def one_row_compiled(x: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() and x.dim() > 1 and x.shape[-2] == 1 and \
        x.device.type == "cpu"


def linear(x: torch.Tensor, weight: torch.Tensor, in_graph: bool = True,
           scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (..., in) @ weight (out, in).T -> (..., out); with ``scale`` (out,), weight is int8
    and the product is ``int8_linear``'s.

    Calls of a few rows (a decoding step, x (B, 1, in), or SSD's verify) on the CPU with
    bf16 or int8 weights go to the hand-written kernels of cpu_matvec.py where they are
    built, eager and compiled: inductor's loop and ATen's GEMM for those dtypes stay well
    below the memory floor.
    Other one-row calls inside a graph compiled for the CPU (fp32) are written out as a
    multiply-and-sum: inductor then generates the matrix-vector product itself,
    vectorised and fused with its neighbours, instead of calling an external GEMM whose
    set-up costs more than the work at these sizes (a d128 projection is 16k
    multiply-adds). Everywhere else (eager, prefill, verify widths > 1, GPUs) it is
    ``F.linear`` (in fp32 for bf16 on a CPU without ``CPU_BF16_GEMM``). ``in_graph=False``
    keeps ``F.linear`` there too (see ``Kernels``).
    """
    if in_graph and cpu_matvec.takes(x, weight, scale):
        return cpu_matvec.matvec(x, weight, scale)
    if scale is not None:
        return int8_linear(x, weight, scale, in_graph)
    if in_graph and one_row_compiled(x):
        return (x.unsqueeze(-2) * weight).sum(-1)     # (..., 1, in) * (out, in) -> (..., out)
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not CPU_BF16_GEMM:
        # In fp32, rounded to bf16 once, as a bf16 GEMM that accumulates in fp32 would
        # give: the widened copy of the weight costs a read of it, the scalar loop far more.
        return F.linear(x.float(), weight.float()).to(x.dtype)
    return F.linear(x, weight)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                in_graph: bool = True) -> torch.Tensor:
    """x (..., in) @ (weight (out, in) int8 * scale (out, 1)).T -> (..., out) in x's dtype:
    weight-only int8 (model/quantize.py).

    A compiled one-row call on the CPU (``in_graph``) is the multiply-and-sum with the
    widening inside the loop inductor generates, and bf16 rows elsewhere on the CPU go to
    ATen's weight-only int8 kernel: both read one byte per weight. Anything else (fp32 or
    fp16 rows outside that loop, GPUs) writes a widened copy of the weight first: correct,
    and slower (ATen's int8 kernel measured slower still with fp32 rows); int8 here is
    meant for bf16 decoding on the CPU.
    """
    if in_graph and one_row_compiled(x):
        # Widened to fp32, not to x's dtype: inductor's loop then converts int8 lanes to
        # fp32 directly (measured on 60 int8 1536 x 576 projections in one graph, 2
        # threads: 35 us each against 47 us through bf16).
        y = (x.float().unsqueeze(-2) * weight.float()).sum(-1) * scale    # (..., 1, in) -> (..., out)
        return y.to(x.dtype)
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        rows = x.reshape(-1, x.shape[-1]).contiguous()                   # (N, in)
        y = torch._weight_int8pack_mm(rows, weight, scale.to(x.dtype))   # (N, out)
        return y.reshape(*x.shape[:-1], -1)
    return (F.linear(x, weight.to(x.dtype)) * scale).to(x.dtype)


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:
    """Attention of one query per sequence over the cache, as plain reductions.

    q (B, H, 1, hd); k, v (B, n_kv, S, hd), the cache's whole buffers; mask (1, S), or
    (B, 1, 1, S) where rows sit at positions of their own, True =
    may attend. What SDPA computes, written so that inductor fuses it into a few loops
    instead of calling SDPA's kernel, whose set-up outweighs one query's work.
    """
    B, H, _, hd = q.shape
    n_kv = k.shape[1]
    # Query heads grouped by the key/value head they share (head h reads kv head h // rep,
    # as Hugging Face's repeat_kv): (B, H, 1, hd) -> (B, n_kv, rep, 1, hd).
    q = q.reshape(B, n_kv, H // n_kv, 1, hd)
    scores = (q * k.unsqueeze(2)).sum(-1) * hd ** -0.5         # (B, n_kv, rep, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    p = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    y = (p.unsqueeze(-1) * v.unsqueeze(2)).sum(-2)            # (B, n_kv, rep, hd)
    return y.reshape(B, H, 1, hd)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     dropout: float = 0.0) -> torch.Tensor:
    """Causal self-attention of a whole sequence from position 0: q (B, H, T, hd); k, v
    (B, n_kv, T, hd) -> (B, H, T, hd).

    SDPA, except in bf16 on the CPU, where its flash kernel's backward is the slowest part
    of a training step (measured at d=128, T=128, fwd + bwd per block: 16.4 ms against
    5.8 ms for these explicit products and 8.4 ms for SDPA's own math backend).
    """
    H, n_kv = q.shape[1], k.shape[1]
    if not (q.device.type == "cpu" and q.dtype == torch.bfloat16):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout,
                                               enable_gqa=n_kv != H)
    if n_kv != H:       # query head h reads kv head h // rep, as Hugging Face's repeat_kv
        k, v = k.repeat_interleave(H // n_kv, dim=1), v.repeat_interleave(H // n_kv, dim=1)
    T = q.shape[2]
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)                 # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    p = torch.softmax(scores.masked_fill(~causal, float("-inf")).float(), dim=-1).to(q.dtype)
    if dropout > 0:
        p = F.dropout(p, dropout, training=True)
    return p @ v


class Linear(nn.Linear):
    """``nn.Linear`` without bias whose one-row calls take ``linear``'s compiled path.
    ``weight_scale`` is None, or (out,) when model/quantize.py made the weight int8."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.register_buffer("weight_scale", None)

    def forward(self, x: torch.Tensor, kernels: Kernels = DECODE_KERNELS) -> torch.Tensor:
        return linear(x, self.weight, kernels.products_in_graph, self.weight_scale)
