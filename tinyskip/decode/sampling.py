"""Sampling: temperature / top-k / top-p (``SamplingConfig`` lives with the other
configs), the next-token choice, and the speculative acceptance rule (Leviathan et al.
2023; Chen et al. 2023)."""

from __future__ import annotations

from typing import Optional

import torch

from ..config import SamplingConfig


def logits_to_probs(logits: torch.Tensor, s: SamplingConfig) -> torch.Tensor:
    """(..., V) logits -> probabilities after temperature, top-k and top-p."""
    logits = logits.float() / s.temperature
    if s.top_k and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # Drop a token when the mass before it already reaches top_p (the top-1 always stays).
        drop = (sorted_p.cumsum(-1) - sorted_p) >= s.top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def choose(logits: torch.Tensor, s: SamplingConfig,
           generator: Optional[torch.Generator]) -> torch.Tensor:
    """(B, V) logits -> (B,) next tokens: argmax when greedy, else a sample."""
    if s.greedy:
        return logits.argmax(-1)
    return torch.multinomial(logits_to_probs(logits, s), 1, generator=generator).squeeze(-1)


def accept_sampled(drafts: list[int], q: list[torch.Tensor], p: torch.Tensor,
                   generator: Optional[torch.Generator]) -> tuple[int, int]:
    """Speculative sampling over drafts x_j with draft probabilities q[j] (V,) and full-model
    probabilities p (m+1, V): returns (accepted drafts, the full model's next token).

    Accept x_j when u < min(1, p_j(x_j) / q_j(x_j)); at the first rejection resample from
    norm(max(0, p_j - q_j)); when all are accepted, the bonus token comes from p_m.
    """
    # Uniforms are drawn on the generator's own device (a CUDA generator cannot fill a CPU tensor).
    device = generator.device if generator is not None else p.device
    for j, x in enumerate(drafts):
        u = float(torch.rand((), generator=generator, device=device))
        if u * float(q[j][x]) < float(p[j][x]):          # u < min(1, p/q), no division
            continue
        residual = (p[j] - q[j]).clamp_min(0.0)
        if float(residual.sum()) <= 0.0:                  # p == q up to rounding
            residual = p[j]
        return j, int(torch.multinomial(residual, 1, generator=generator))
    return len(drafts), int(torch.multinomial(p[len(drafts)], 1, generator=generator))
