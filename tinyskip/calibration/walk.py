"""Calibrating dynamic early exit (CALM with Learn-then-Test) on a trained model.

For a descending grid of thresholds lambda_1 > lambda_2 > ..., each calibration prompt
is decoded with DEE at lambda_j and compared with the full model's greedy output (decoded
once). The per-example losses go to the statistics of ``ltt.py``: fixed-sequence testing
with Hoeffding-Bentkus p-values returns the lowest threshold whose expected loss is
<= delta with probability >= 1 - epsilon. Every threshold is decoded for real (no
teacher-forced shortcut, which would not carry the guarantee), and the walk down the
grid stops once both the test and the naive baseline have failed, so the cost is the
thresholds that pass plus one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from ..config import MEASURE_RANGES, DEEConfig, UserError
from ..decode import dee_generate, generate
from ..decode.confidence import TokenConfidence
from ..decode.stats import DecodeStats
from ..model.exit_classifier import ExitClassifier
from ..model.exits import ExitHead
from ..model.transformer import Transformer
from . import ltt


@dataclass
class Example:
    prompt: list[int]
    reference: list[int]        # the data's own continuation
    full: list[int]             # the full model's greedy continuation


def sample_windows(tokens: np.ndarray, n: int, prompt_len: int, new_tokens: int,
                   seed: int) -> list[tuple[list[int], list[int]]]:
    """n (prompt, reference) windows drawn by seed among the split's disjoint windows, so
    that no text is shared between examples (nor between random halves of them)."""
    span = prompt_len + new_tokens
    slots = tokens.size // span
    if n > slots:
        raise UserError(f"n={n} examples of {prompt_len} + {new_tokens} tokens need {n * span} "
                        f"tokens; the split holds {tokens.size} ({slots} windows)")
    g = np.random.default_rng(seed)
    starts = g.choice(slots, size=n, replace=False) * span
    return [(tokens[s:s + prompt_len].astype(np.int64).tolist(),
             tokens[s + prompt_len:s + span].astype(np.int64).tolist()) for s in starts]


def decode_full(model: Transformer, windows, max_new_tokens: int, eos_id
                ) -> tuple[list[Example], DecodeStats]:
    """The full model's greedy continuation of every window, and the summed statistics."""
    dev = next(model.parameters()).device
    out, stats = [], DecodeStats()
    for prompt, ref in windows:
        g = generate(model, torch.tensor([prompt], device=dev), max_new_tokens, eos_id=eos_id)
        out.append(Example(prompt, ref, g.tokens[0]))
        stats = stats + g.stats
    return out, stats


def example_loss(kind: str, early: list[int], ex: Example) -> float:
    """Textual consistency with the full output (f1, mismatch) or risk consistency
    against the reference (risk = 1 - token F1 with the data's continuation)."""
    if kind == "f1":
        return ltt.f1_loss(early, ex.full)
    if kind == "mismatch":
        return ltt.mismatch_loss(early, ex.full)
    return ltt.risk_consistency_loss(ltt.f1_loss(early, ex.reference),
                                     ltt.f1_loss(ex.full, ex.reference))


def threshold_grid(confidences: np.ndarray, measure: str, n: int) -> list[float]:
    """Up to n thresholds, descending from the highest confidence seen: the quantiles
    1, 1 - 1/n, ... of ``confidences`` (an exit's confidences on text the calibration
    never scores, so the grid is fixed before any calibration loss is seen). Quantiles put
    the grid where the measure's values lie (saturation's cosines crowd just below 1,
    where an even grid over [-1, 1] would have one point)."""
    lo, hi = MEASURE_RANGES[measure]
    values = confidences[np.isfinite(confidences)]
    if values.size == 0:
        return [hi]
    q = np.quantile(values, np.linspace(1.0, 0.0, n + 1)[:n])
    return sorted({float(np.clip(v, lo, hi)) for v in q}, reverse=True)


def dee_losses(model: Transformer, examples: list[Example], cfg: DEEConfig, max_new_tokens: int,
               eos_id, kind: str, classifier: Optional[ExitClassifier] = None
               ) -> tuple[np.ndarray, DecodeStats]:
    """Per-example losses of DEE under ``cfg`` and the summed decoding statistics."""
    dev = next(model.parameters()).device
    losses, stats = [], DecodeStats()
    for ex in examples:
        g = dee_generate(model, torch.tensor([ex.prompt], device=dev), max_new_tokens, cfg,
                         eos_id=eos_id, classifier=classifier)
        losses.append(example_loss(kind, g.tokens[0], ex))
        stats = stats + g.stats
    return np.asarray(losses), stats


def walk_grid(model: Transformer, examples: list[Example], base: DEEConfig, grid: list[float],
              max_new_tokens: int, eos_id, kind: str, delta: float, epsilon: float,
              quality: float, full_grid: bool = False,
              progress: Optional[Callable] = None,
              classifier: Optional[ExitClassifier] = None) -> dict:
    """Losses (rows = thresholds walked, in grid order) until LTT and the naive baseline
    have both failed (or over the whole grid with ``full_grid``)."""
    rows, stats = [], []
    ltt_ok = naive_ok = True
    n = len(examples)
    walk = progress(grid) if progress else grid
    for lam in walk:
        if progress:
            walk.set_postfix(threshold=f"{lam:.4g}")
        cfg = dataclasses.replace(base, threshold=[lam])
        losses, st = dee_losses(model, examples, cfg, max_new_tokens, eos_id, kind, classifier)
        rows.append(losses)
        stats.append(st)
        risk = float(losses.mean())
        ltt_ok = ltt_ok and ltt.hb_pvalue(risk, n, delta) <= epsilon
        naive_ok = naive_ok and ltt.keeps_quality(risk, quality)
        if not (ltt_ok or naive_ok or full_grid):
            break
    if progress:
        walk.close()
    return {"thresholds": grid[:len(rows)], "losses": np.stack(rows), "stats": stats}


@torch.no_grad()
def exit_confidences(model: Transformer, examples: list[Example], measure: str,
                     exits: list[int], classifier: Optional[ExitClassifier] = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced confidences (n_exits, N) at the checked exits over the full model's
    outputs, and whether each exit's argmax equals the last exit's (n_exits, N)."""
    dev = next(model.parameters()).device
    head, L = ExitHead(model), model.num_layers
    conf, agree = [], []
    for ex in examples:
        if not ex.full:
            continue
        ids = torch.tensor([ex.prompt + ex.full[:-1]], device=dev)
        h = model.embed(ids)
        states, logits = {}, {}
        start = len(ex.prompt) - 1           # the states that predict the new tokens
        for layer in range(L):
            h = model.run_layers(h, layer, layer + 1)
            e = layer + 1
            if e in exits or e == L:
                # The exit's logits over the whole sequence (its module may attend), then
                # the new tokens' rows: (new, d) and (new, V).
                logits[e] = head.logits(h, e)[0, start:]
                states[e] = h[0, start:]
        final = logits[L].argmax(-1)
        for t in range(final.shape[0]):
            tc = TokenConfidence(measure, classifier)
            c, a = [], []
            for e in exits:
                c.append(tc.check(e, states[e][t], lambda: logits[e][t])[0])
                a.append(float(logits[e][t].argmax() == final[t]))
            conf.append(c)
            agree.append(a)
    return np.asarray(conf).T, np.asarray(agree).T
