"""Learn-then-Test calibration statistics (CALM): pure functions, no model code.

Formulas follow ``early-exit-notes.md`` section 3. Name mapping, because the two papers
swap the letters: CALM's ``delta`` (tolerance on the expected loss) is LTT's ``alpha``,
and CALM's ``epsilon`` (failure probability) is LTT's ``delta``. tinyskip uses CALM's
names throughout: the guarantee is P(E[L] <= delta) >= 1 - epsilon.

Thresholds are confidences (higher = more confident), so a grid walked from high to low
goes from "almost never exit" (safe) towards "exit early" (fast, riskier).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np


def _check_unit_open(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name}={value}: must be in (0, 1)")


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space so that large n does not underflow."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0  # all mass sits at n > k
    log_p, log_q = math.log(p), math.log1p(-p)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
            + i * log_p + (n - i) * log_q for i in range(k + 1)]
    top = max(logs)  # log-sum-exp: factor out the largest term before exponentiating
    return min(1.0, math.exp(top) * math.fsum(math.exp(x - top) for x in logs))


def _h1(a: float, b: float) -> float:
    """Bernoulli KL divergence kl(a || b); the a log(a/b) term vanishes as a -> 0."""
    if a == 0.0:
        return -math.log1p(-b)
    return a * math.log(a / b) + (1.0 - a) * math.log((1.0 - a) / (1.0 - b))


def hb_pvalue(risk: float, n: int, delta: float) -> float:
    """Hoeffding-Bentkus p-value for H: E[L] > delta, given the mean ``risk`` of n losses in [0, 1].

    A small p-value is evidence that the expected loss is at most delta.
    """
    _check_unit_open("delta", delta)
    if n < 1:
        raise ValueError(f"n={n}: need at least one example")
    if not 0.0 <= risk <= 1.0:
        raise ValueError(f"risk={risk}: must be in [0, 1]")
    hoeffding = math.exp(-n * _h1(min(risk, delta), delta))
    # risk is a float mean: 30 losses of 0.1 give 30 * np.mean = 3.000000000000001. Rounding
    # before ceil keeps that noise from moving the count up by a whole example.
    k = math.ceil(round(n * risk, 9))
    bentkus = math.e * binom_cdf(k, n, delta)
    return min(1.0, max(0.0, min(hoeffding, bentkus)))


def min_examples(delta: float, epsilon: float) -> int:
    """Smallest n for which a zero empirical risk passes: hb_pvalue(0, n, delta) <= epsilon."""
    _check_unit_open("delta", delta)
    _check_unit_open("epsilon", epsilon)
    # At R = 0 the two terms are (1-delta)^n and e (1-delta)^n, so p = (1-delta)^n.
    n = max(1, math.ceil(math.log(epsilon) / math.log1p(-delta)))
    # The closed form can be off by one where log(eps)/log(1-delta) is nearly an integer;
    # hb_pvalue is what calibration actually compares, so let it decide.
    if hb_pvalue(0.0, n, delta) > epsilon:
        n += 1
    elif n > 1 and hb_pvalue(0.0, n - 1, delta) <= epsilon:
        n -= 1
    return n


def fixed_sequence_test(thresholds: Sequence[float], risks: Sequence[float], n: int,
                        delta: float, epsilon: float) -> tuple[int, list[float]]:
    """Accept thresholds in their fixed (descending) order until the first p-value > epsilon.

    Returns (number accepted, p-values computed so far). No multiplicity correction is
    needed only because the order is fixed in advance and the walk never skips a failure,
    so it must stop there even if later thresholds would pass.
    """
    if len(thresholds) != len(risks):
        raise ValueError(f"{len(thresholds)} thresholds but {len(risks)} risks")
    if any(b >= a for a, b in zip(thresholds, thresholds[1:])):
        raise ValueError(f"thresholds must be strictly descending, got {list(thresholds)}")
    pvalues: list[float] = []
    for risk in risks:
        pvalues.append(hb_pvalue(float(risk), n, delta))
        if pvalues[-1] > epsilon:
            return len(pvalues) - 1, pvalues
    return len(pvalues), pvalues


def _check_losses(thresholds: Sequence[float], losses: np.ndarray) -> np.ndarray:
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 2 or losses.shape[0] != len(thresholds):
        raise ValueError(f"losses shape {losses.shape}: expected ({len(thresholds)}, n_examples)")
    if not np.all((losses >= 0.0) & (losses <= 1.0)):  # also rejects NaN
        raise ValueError("losses must lie in [0, 1]")
    return losses


def calibrate_threshold(thresholds: Sequence[float], losses: np.ndarray, delta: float,
                        epsilon: float) -> dict:
    """CALM calibration: the lowest threshold with E[loss] <= delta w.p. >= 1 - epsilon.

    ``losses[j, i]`` is example i's loss when exiting at ``thresholds[j]``. A threshold
    of None means no grid value is certified: never exit early.
    """
    _check_unit_open("delta", delta)
    _check_unit_open("epsilon", epsilon)
    losses = _check_losses(thresholds, losses)
    n = losses.shape[1]
    need = min_examples(delta, epsilon)
    if n < need:
        raise ValueError(f"n={n}: too few calibration examples for any guarantee at "
                         f"delta={delta}, epsilon={epsilon}: need at least {need}")
    risks = [float(r) for r in losses.mean(axis=1)]
    accepted, pvalues = fixed_sequence_test(thresholds, risks, n, delta, epsilon)
    index = accepted - 1 if accepted else None
    return {"threshold": None if index is None else float(thresholds[index]),
            "index": index, "risks": risks, "pvalues": pvalues, "n": n}


def split_frequency(thresholds: Sequence[float], losses: np.ndarray, delta: float,
                    epsilon: float, n_splits: int, seed: int = 0) -> dict:
    """The guarantee as a frequency: over ``n_splits`` random halvings of a pool of
    examples (``losses`` over the whole grid), calibrate on one half, measure the mean
    loss at the chosen threshold on the other; the share of splits whose held-out loss
    exceeds delta should stay <= epsilon (up to the held-out half's own noise). Never
    exiting reproduces the full output, so its loss is 0."""
    losses = _check_losses(thresholds, losses)
    n = losses.shape[1]
    rng = np.random.default_rng(seed)
    test_losses = []
    for _ in range(n_splits):
        order = rng.permutation(n)
        cal, held = order[: n // 2], order[n // 2:]
        index = calibrate_threshold(thresholds, losses[:, cal], delta, epsilon)["index"]
        test_losses.append(0.0 if index is None else float(losses[index, held].mean()))
    t = np.asarray(test_losses)
    return {"n_splits": n_splits, "n_cal": n // 2, "n_test": n - n // 2,
            "violation_rate": float((t > delta).mean()), "test_loss_mean": float(t.mean()),
            "test_loss_std": float(t.std()), "test_losses": test_losses}


def keeps_quality(risk: float, quality: float) -> bool:
    """The naive baseline's test: mean loss <= 1 - quality (the slack lets a mean exactly
    at the bar pass despite rounding: 1 - 0.9 < 0.1 in floating point)."""
    return risk <= 1.0 - quality + 1e-12


def naive_threshold(thresholds: Sequence[float], losses: np.ndarray,
                    quality: float = 0.95) -> float | None:
    """Baseline without a guarantee: lowest threshold whose mean loss is <= 1 - quality.

    Walks the descending grid like ``fixed_sequence_test`` and stops at the first failure,
    so the two differ only in the acceptance rule. None when the first threshold fails.
    """
    losses = _check_losses(thresholds, losses)
    chosen = None
    for threshold, risk in zip(thresholds, losses.mean(axis=1)):
        if not keeps_quality(risk, quality):
            break
        chosen = float(threshold)
    return chosen


def accuracy_level_thresholds(confidences: np.ndarray, agree: np.ndarray,
                              level: float) -> list[float | None]:
    """DSSD per-exit thresholds: lowest c with mean(agree | confidence >= c) >= level.

    ``confidences`` and ``agree`` are (n_exits, n_tokens); agree is 1 where the exit's
    token matches the final layer's. None for an exit whose best selection misses ``level``.
    """
    confidences, agree = np.asarray(confidences, dtype=np.float64), np.asarray(agree)
    if confidences.ndim != 2 or confidences.shape != agree.shape:
        raise ValueError(f"shapes {confidences.shape} and {agree.shape}: "
                         "expected equal (n_exits, n_tokens)")
    out: list[float | None] = []
    for conf, agr in zip(confidences, agree.astype(np.float64)):
        if len(conf) == 0:
            out.append(None)
            continue
        order = np.argsort(-conf, kind="stable")
        c_sorted = conf[order]
        # Prefix i holds the i+1 most confident tokens: its agreement rate is a cumulative mean.
        rate = np.cumsum(agr[order]) / np.arange(1, len(conf) + 1)
        # "confidence >= c" takes a whole group of tied values, so only a group's last
        # position is a selection some threshold can make.
        group_end = np.append(c_sorted[:-1] != c_sorted[1:], True)
        ok = np.flatnonzero(group_end & (rate >= level))
        out.append(float(c_sorted[ok[-1]]) if len(ok) else None)
    return out


def token_f1(a: Sequence[int], b: Sequence[int]) -> float:
    """Bag-of-tokens F1 (as in SQuAD): order is ignored, repeated tokens count separately."""
    if not a and not b:
        return 1.0
    common = sum((Counter(a) & Counter(b)).values())
    if common == 0:  # includes exactly one side empty
        return 0.0
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)


def f1_loss(early: Sequence[int], full: Sequence[int]) -> float:
    """Textual-consistency loss 1 - token F1 between the early-exit and full-model outputs."""
    return 1.0 - token_f1(early, full)


def mismatch_loss(early: Sequence[int], full: Sequence[int]) -> float:
    """Fraction of positions that differ, over the longer output (extra tokens all differ)."""
    longest = max(len(early), len(full))
    if longest == 0:
        return 0.0
    differ = sum(x != y for x, y in zip(early, full)) + abs(len(early) - len(full))
    return differ / longest


def risk_consistency_loss(early_risk: float, full_risk: float) -> float:
    """CALM's risk consistency: how much worse early exit does against the reference.

    Risks are lower-is-better, e.g. risk = 1 - score with score the token F1 against the
    reference Z. Exiting early is not penalised for beating the full model.
    """
    return min(1.0, max(0.0, early_risk - full_risk))
