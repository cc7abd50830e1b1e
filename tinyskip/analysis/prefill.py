"""Prefill against the matrix peak: a long prompt through all blocks is matrix work (unlike
a one-token step, bound by reading the weights), so its floor is the arithmetic, measured
here as the speed of one large matrix product in the model's dtype in the same run."""

from __future__ import annotations

import torch

from ..decode.stats import DecodeStats
from ..decode.steps import new_cache, prefill
from ..model.kernels import Linear
from ..model.transformer import Transformer
from ..runtime import median_seconds


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
