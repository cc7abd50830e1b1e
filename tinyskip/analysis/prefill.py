"""Prefill against the matrix peak: a long prompt through all blocks is matrix work (unlike
a one-token step, bound by reading the weights), so its floor is the arithmetic, measured
here as the speed of one large matrix product in the model's dtype in the same run."""

from __future__ import annotations

import torch

from ..decode.stats import DecodeStats
from ..decode.steps import new_cache, prefill, sync
from ..model.kernels import Linear
from ..model.transformer import Transformer
from ..runtime import median_seconds, seconds


def prefill_flops(model: Transformer, T: int) -> float:
    """Floating-point operations of prefilling T tokens: every block projection on T
    rows, causal attention (scores and the weighted sum, each ~T^2/2 entries of d
    products per block), and the head on the last position."""
    cfg = model.config
    block = sum(m.in_features * m.out_features for m in model.layers[0].modules()
                if isinstance(m, Linear))
    attention = 2 * (T * T / 2) * cfg.num_attention_heads * cfg.head_dim
    return 2 * (cfg.num_hidden_layers * (block * T + attention) + cfg.vocab_size * cfg.hidden_size)


@torch.no_grad()
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
        a @ b                                           # the first call sets the GEMM up
        sync(device)
        if n >= n_max or seconds(lambda: a @ b, device) >= call_s:
            return 2 * n ** 3 / median_seconds(lambda: a @ b, reps, device)
        n *= 2


@torch.no_grad()
def prefill_speed(model: Transformer, prompt: torch.Tensor, peak: float, reps: int = 3) -> dict:
    """Tokens/s and FLOP/s of prefilling ``prompt`` (1, T) into a fresh cache, as every
    decoding mode starts (``decode.steps.prefill``), median of ``reps`` after the warm-up,
    beside ``peak``, the FLOP/s of ``matrix_peak`` in the model's dtype."""
    T, device = prompt.shape[1], prompt.device
    cache = new_cache(model, prompt, 1)

    def run():
        prefill(model, prompt, cache, model.num_layers, DecodeStats())

    s = median_seconds(run, reps, device)
    flops = prefill_flops(model, T) / s
    return {"prefill_tokens": T, "prefill_tokens_per_s": T / s, "prefill_tflops": flops / 1e12,
            "matrix_peak_tflops": peak / 1e12, "prefill_of_peak": flops / peak}
