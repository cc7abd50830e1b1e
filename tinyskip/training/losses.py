"""LayerDrop schedules, early-exit loss weights and curricula, distillation.

Formulas follow ``early-exit-notes.md`` section 1 (LayerSkip, CALM). Blocks are numbered
0..L-1 and exit l is the output of block l.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..config import ConfigError, TrainConfig
from .cross_entropy import (ChunkedCrossEntropy, kl_rows, linear_cross_entropy,
                            linear_distilled_cross_entropy, teacher_distribution)


def layerdrop_probs(cfg: TrainConfig, num_layers: int, step: int) -> list[float]:
    """p_l = S(t) * D(l) * p_max for every block at training step ``step``."""
    if cfg.layerdrop_p_max == 0.0:
        return [0.0] * num_layers
    L, T = num_layers, cfg.max_steps
    if cfg.layerdrop_time == "constant":
        s = 1.0
    else:  # "exp": 0 at the first step, 1 at the last (for training from scratch)
        s = 2.0 ** (step / max(T - 1, 1)) - 1.0
    out = []
    for layer in range(L):
        frac = layer / max(L - 1, 1)
        d = {"uniform": 1.0, "linear": frac, "exp": 2.0 ** frac - 1.0}[cfg.layerdrop_depth]
        out.append(s * d * cfg.layerdrop_p_max)
    return out


def exit_scales(kind: str, num_layers: int, e_scale: float) -> list[float]:
    """Unnormalised per-exit weights e(l) for l in 0..L-1 (``none``: last exit only)."""
    L = num_layers
    cumulative = [l * (l + 1) / 2 for l in range(L)]            # sum_{i<=l} i
    if kind == "none":
        return [0.0] * (L - 1) + [1.0]
    if kind == "calm":                                          # CALM's ramp, no e_scale
        return [float(l + 1) for l in range(L)]
    if kind == "layerskip":
        # The paper's form: e(l) = e_scale * sum_{i<=l} i, and the last layer also gets L-1.
        return [e_scale * c for c in cumulative[:-1]] + [(L - 1) + e_scale * cumulative[-2]
                                                         if L > 1 else 1.0]
    base = {"uniform": [1.0] * L, "linear": [float(l + 1) for l in range(L)],
            "sum_l": cumulative}.get(kind)
    if base is None:
        raise ConfigError(f"exit_weighting={kind!r}: must be one of none, uniform, linear, calm, "
                          "sum_l, layerskip")
    return [e_scale * w for w in base[:-1]] + [base[-1] or 1.0]


def curriculum_exits(cfg: TrainConfig, num_layers: int, step: int) -> list[int]:
    """Exits (1..L) switched on at ``step``, C(t, l); the last exit is always on. The
    curricula count blocks from 0 (block l feeds exit l + 1), as the papers write them."""
    L = num_layers
    if cfg.exit_weighting == "none" or cfg.curriculum == "none":
        active = range(L) if cfg.exit_weighting != "none" else []
    elif cfg.curriculum == "rotational":
        # Every R-th layer, the pattern shifted by one each step: ceil(L/R) exits per step.
        R = cfg.curriculum_rotation
        active = [l for l in range(L) if (l - step) % R == 0]
    elif cfg.curriculum == "gradual":
        # From the last layer down: one more exit every T / (2L) steps.
        every = max(cfg.max_steps / (2 * L), 1e-9)
        n = min(L, 1 + int(step // every))
        active = range(L - n, L)
    else:
        raise ConfigError(f"curriculum={cfg.curriculum!r}: must be one of none, rotational, "
                          "gradual")
    return [l + 1 for l in sorted(set(active) | {L - 1})]


def exit_weights(cfg: TrainConfig, num_layers: int, step: int) -> tuple[list[int], torch.Tensor]:
    """Active exits (1..L) and their normalised weights e~(t, l) (zero-weight exits are
    left out)."""
    scales = exit_scales(cfg.exit_weighting, num_layers, cfg.e_scale)     # scales[e - 1]: exit e
    exits = [e for e in curriculum_exits(cfg, num_layers, step) if scales[e - 1] > 0]
    w = torch.tensor([scales[e - 1] for e in exits])
    return exits, w / w.sum()


def early_exit_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted CE over exits: logits (n, B, T, V), targets (B, T), weights (n,).

    Returns (weighted total, per-exit mean CE (n,)). One CE call covers every exit.
    """
    n, B, T, V = logits.shape
    nll = ChunkedCrossEntropy.apply(logits.reshape(n * B * T, V),
                                    targets.reshape(1, B * T).expand(n, -1).reshape(-1))
    per_exit = nll.view(n, B * T).mean(dim=1)
    return (per_exit * weights.to(per_exit.device)).sum(), per_exit


def sampled_exit_loss(states: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
                      weights: torch.Tensor, fraction: float = 1.0,
                      generator: Optional[torch.Generator] = None, rows: slice = slice(None),
                      global_batch: Optional[int] = None, distill_weight: float = 0.0,
                      temperature: float = 1.0, compiled: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``early_exit_loss`` from the states the head reads, states (n, B, T, d), through
    the fused linear + cross-entropy (head_weight (V, d)): the logits are never held.

    Every exit but the last scores a random ``fraction`` of the global batch's tokens (one
    subset per step, shared by those exits, drawn from ``generator`` over all
    ``global_batch`` rows; this process holds ``rows`` of them and scores the drawn
    positions that fall in its rows), so each one's mean CE is an unbiased estimate of
    its full one for that fraction of the head's cost, and data-parallel ranks together
    score exactly what one process would.

    ``distill_weight`` > 0 adds self-distillation on the same tokens: that weight times
    the exits' weighted mean of KL(p_last || p_exit) at ``temperature`` (times T^2), the
    last exit's distribution detached (the teacher), so each earlier exit learns to agree
    with the last one, which is what SSD's acceptance and DEE's exit rate follow. The
    shared subset is why the teacher is cheap: its distribution is made once, at those
    positions, for every exit (an (r, V) fp32 tensor for this process's r scored
    positions); the exits' CE and KL share one fused, chunked pass that holds no student
    logits (``compiled``: its elementwise kernels through torch.compile).
    Returns (weighted total, per-exit mean CE, tokens scored here).
    """
    n, B, T, d = states.shape
    Bg = global_batch or B
    flat, y = states.reshape(n, B * T, d), targets.reshape(B * T)
    m = Bg * T if fraction >= 1.0 else max(1, round(fraction * Bg * T))
    idx = None                          # this process's scored rows of each flat[i]
    if m < Bg * T and n > 1:
        # Global row -> index among this process's rows (-1: another rank's).
        local = torch.full((Bg,), -1, dtype=torch.long)
        local[torch.arange(Bg)[rows]] = torch.arange(B)
        pos = torch.randperm(Bg * T, generator=generator)[:m]             # global positions
        lb = local[pos // T]
        idx = (lb * T + pos % T)[lb >= 0].to(states.device)

    # The earlier exits' scored states (n-1, r, d), gathered in one copy (none: (0, BT, d)).
    picked = flat[:-1] if idx is None else flat[:-1].index_select(1, idx)
    picked_y = y if idx is None else y.index_select(0, idx)                      # (r,)
    r = picked.shape[1]
    if distill_weight > 0 and n > 1:
        last = flat[-1] if idx is None else flat[-1].index_select(0, idx)         # (r, d)
        teacher = teacher_distribution(last, head_weight, temperature, compiled)
        nll_early, kl = linear_distilled_cross_entropy(picked, teacher, head_weight, picked_y,
                                                       temperature, compiled)  # (n-1, r) each
        nll_last = linear_cross_entropy(flat[-1], head_weight, y)
    else:
        kl = None
        # One fused call over the earlier exits' rows ((n-1) * r, d) and the last's (B * T, d).
        nll = linear_cross_entropy(torch.cat([picked.reshape(-1, d), flat[-1]]), head_weight,
                                   torch.cat([picked_y.repeat(n - 1), y]))
        nll_early, nll_last = nll[:-B * T].view(n - 1, r), nll[-B * T:]
    # Sums over this process's share, divided by its share of the global count, so that
    # the ranks' mean (what DDP's gradient averaging takes) is the global mean.
    count = B * T if idx is None else m * B / Bg
    per_exit = torch.cat([nll_early.sum(1) / count, nll_last.sum().view(1) / (B * T)])
    total = (per_exit * weights.to(per_exit.device)).sum()
    if kl is not None:
        w = weights[:-1].to(per_exit.device)
        total = total + distill_weight * (kl.sum(1) / count * w).sum() / w.sum().clamp_min(1e-12)
    return total, per_exit, (n - 1) * r + B * T


def exit_kl(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_final || p_exit) (n-1,) of each exit against the last (detached) one, over
    logits (n, B, T, V), mean over tokens, times T^2 (Hinton's scaling)."""
    return kl_rows(logits[:-1], logits[-1].detach(), temperature).mean(dim=(1, 2))
