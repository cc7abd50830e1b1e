"""Per-exit loss and word-level perplexity of a model on a token array."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..model.transformer import Transformer
from ..runtime import autocast, progress_bar
from ..storage.data import IGNORE, eval_windows


@torch.no_grad()
def exit_perplexities(model: Transformer, tokens: np.ndarray, words: int, seq_len: int,
                      batch_size: int = 16, max_batches: int = 0, bf16: bool = False,
                      progress: bool = False, stride: Optional[int] = None) -> dict:
    """Loss (nats per token), word-level perplexity and agreement with the last exit, at
    every exit (lists run from exit 1 to exit L).

    ``agreement``: teacher-forced top-1 agreement of the exit with the last exit (what
    bounds SSD's greedy acceptance and DEE's exit rate); ``p_last_top``: the mean
    probability the exit gives to the last exit's argmax (what speculative sampling
    accepts on); ``confidence``: the mean probability the exit gives to its own argmax
    (what DEE's softmax measure and SSD's adaptive drafting compare with their thresholds).
    Exits are unembedded one at a time (not stacked) so that memory stays at
    one exit's logits. With ``max_batches`` only a prefix of the split is scored and the
    word count is scaled by the fraction of tokens seen. ``stride``: sliding windows, every
    scored token with at least seq_len - stride tokens of context (``data.eval_windows``).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    L = model.num_layers
    nll = torch.zeros(L, dtype=torch.float64)
    agree = torch.zeros(L, dtype=torch.float64)
    p_top = torch.zeros(L, dtype=torch.float64)
    conf = torch.zeros(L, dtype=torch.float64)
    n_tokens = 0
    batches = eval_windows(tokens, seq_len, batch_size, max_batches, stride)
    if progress:
        batches = progress_bar(batches, desc="eval", total=window_batches(
            tokens.size - 1, seq_len, batch_size, stride, max_batches))
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        scored = y != IGNORE                                                 # (B, T)
        targets = y[scored]                                                  # (N,)
        with autocast(device, bf16):
            # Every exit's hidden state first (L x (B, T, d): small); the head then reads
            # only the scored positions (half of each window at stride seq_len / 2).
            h, states = model.embed(x), []
            for layer in range(L):
                h = model.run_layers(h, layer, layer + 1)
                states.append(h)
            # The last exit first, so that its argmax is known when the others are scored.
            for layer in reversed(range(L)):
                read = model.exit_state(states[layer], layer + 1)[scored]    # (N, d)
                logits = model.lm_head(read).float()                         # (N, V)
                if layer == L - 1:
                    top = logits.argmax(-1)                                  # (N,)
                nll[layer] += F.cross_entropy(logits, targets, reduction="sum").item()
                agree[layer] += (logits.argmax(-1) == top).sum().item()
                probs = torch.softmax(logits, -1)                            # (N, V)
                p_top[layer] += probs.gather(-1, top[:, None]).sum().item()
                conf[layer] += probs.max(-1).values.sum().item()
        n_tokens += int(scored.sum())
    model.train(was_training)
    scored_words = words * n_tokens / max(tokens.size - 1, 1)
    loss = (nll / n_tokens).tolist()
    word_ppl = [math.exp(min(v / scored_words, 700.0)) for v in nll.tolist()]
    return {"loss": loss, "word_ppl": word_ppl, "agreement": (agree / n_tokens).tolist(),
            "p_last_top": (p_top / n_tokens).tolist(),
            "confidence": (conf / n_tokens).tolist(), "tokens": n_tokens}


def window_batches(targets: int, seq_len: int, batch_size: int, stride: Optional[int],
                   max_batches: int = 0) -> int:
    """How many batches ``eval_windows`` yields for a split of ``targets`` + 1 tokens."""
    if stride is None:      # whole windows, then (unless capped) the remainder as one more
        whole = math.ceil((targets // seq_len) / batch_size)
        return min(max_batches, whole) if max_batches else whole + (targets % seq_len > 0)
    T = min(seq_len, targets)
    starts = (targets - T) // stride + 1
    starts += ((starts - 1) * stride + T < targets)     # the window ending on the last target
    return min(max_batches or math.inf, math.ceil(starts / batch_size))
