"""Quality of generated text, for the benchmark: its perplexity under the full model and
its ROUGE-L against the reference continuation.

ROUGE-L comes from Google's ``rouge-score`` package (the implementation the summarisation
literature and Hugging Face ``evaluate`` report), not a hand-written LCS, so the numbers
compare with published ones.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from ..model.transformer import Transformer


@torch.no_grad()
def continuation_nll(model: Transformer, prompt: torch.Tensor, tokens: list[int]) -> float:
    """Summed negative log-likelihood (nats) of ``tokens`` following ``prompt`` (1, P)
    under the full model, teacher-forced in one pass."""
    if not tokens:
        return 0.0
    ids = torch.cat([prompt, torch.tensor([tokens], device=prompt.device)], dim=1)
    logits = model(ids[:, :-1])[0, 0, prompt.shape[1] - 1:]       # (len(tokens), V)
    target = ids[0, prompt.shape[1]:]
    return F.cross_entropy(logits.float(), target, reduction="sum").item()


def perplexity(nll: float, count: int) -> float:
    return math.exp(nll / count) if count else float("nan")


class RougeL:
    """ROUGE-L F-measure of a generated text against a reference text."""

    def __init__(self) -> None:
        from rouge_score import rouge_scorer

        logging.getLogger("absl").setLevel(logging.WARNING)     # its INFO lines are noise here
        self._scorer = rouge_scorer.RougeScorer(["rougeL"])

    def __call__(self, reference: str, generated: str) -> float:
        return self._scorer.score(reference, generated)["rougeL"].fmeasure
