"""Confidence of an exit, one definition per measure (higher = more confident), shared by
dynamic early exit and SSD's adaptive drafting.

Head-based measures (softmax, margin, entropy, repeat, convergence) cost one head call
per check; ``saturation`` and ``classifier`` (CALM's learned exit classifier, see
exit_classifier.py) read the hidden state and call the head only at the exit taken. Measures that compare with the previous checked exit have nothing to compare
with at the first one, which therefore never exits under them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from ..model.exit_classifier import ExitClassifier

HEAD_FREE = frozenset({"saturation", "classifier"})


def max_prob(probs: torch.Tensor) -> float:
    """Top-1 probability of (V,) probabilities."""
    return float(probs.max())


def margin(probs: torch.Tensor) -> float:
    """Top-1 minus top-2 probability (CALM's softmax response)."""
    top = torch.topk(probs, 2).values
    return float(top[0] - top[1])


def entropy_confidence(probs: torch.Tensor) -> float:
    """1 - H(p) / ln V: 1 for a one-hot distribution, 0 for the uniform one."""
    h = -(probs * probs.clamp_min(1e-30).log()).sum()
    return 1.0 - float(h) / math.log(probs.shape[-1])


def saturation(h_prev: torch.Tensor, h: torch.Tensor) -> float:
    """Cosine of the (d,) hidden states at two consecutive checked exits."""
    return float(F.cosine_similarity(h_prev.float(), h.float(), dim=-1))


def decayed_threshold(threshold: float, t: int, n: int, tau: float) -> float:
    """CALM's decaying threshold at generation step t of n (the official code's form,
    threshold * (0.9 + 0.1 exp(-tau t / n)), with t actually passed): tau = 0 keeps it."""
    if tau == 0 or math.isinf(threshold):
        return threshold
    return threshold * (0.9 + 0.1 * math.exp(-tau * t / max(n, 1)))


class TokenConfidence:
    """The confidence of one token at its successive checked exits (batch of one).

    ``check(exit, h, logits_fn)`` takes the (d,) hidden state at the next checked exit and
    a function computing that exit's (V,) logits; it returns (confidence, logits or None)
    and calls ``logits_fn`` only when the measure needs the head.
    """

    def __init__(self, measure: str, classifier: Optional["ExitClassifier"] = None):
        if measure == "classifier" and classifier is None:
            raise ValueError("measure=classifier needs a trained ExitClassifier")
        self.measure = measure
        self.classifier = classifier
        self.prev_h: Optional[torch.Tensor] = None
        self.prev_top: Optional[int] = None
        self.prev_p: Optional[float] = None

    def check(self, exit: int, h: torch.Tensor, logits_fn: Callable[[], torch.Tensor]
              ) -> tuple[float, Optional[torch.Tensor]]:
        m = self.measure
        if m == "classifier":
            return self.classifier.confidence(exit, h), None
        if m == "saturation":
            conf = -math.inf if self.prev_h is None else saturation(self.prev_h, h)
            self.prev_h = h
            return conf, None
        logits = logits_fn()
        probs = torch.softmax(logits.float(), -1)
        if m == "softmax":
            return max_prob(probs), logits
        if m == "margin":
            return margin(probs), logits
        if m == "entropy":
            return entropy_confidence(probs), logits
        top, p = int(probs.argmax()), max_prob(probs)
        prev_top, prev_p = self.prev_top, self.prev_p
        self.prev_top, self.prev_p = top, p
        if prev_top is None:
            return -math.inf, logits
        if m == "repeat":
            return float(top == prev_top), logits
        if m == "convergence":
            return 1.0 - abs(p - prev_p), logits
        raise ValueError(f"unknown confidence measure {m!r}")
