"""Per-exit loss and word-level perplexity of a model on a token array."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from .data import eval_windows
from .model import Transformer


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on the model's device type, or nothing."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def exit_perplexities(model: Transformer, tokens: np.ndarray, words: int, seq_len: int,
                      batch_size: int = 16, max_batches: int = 0, bf16: bool = False,
                      progress: bool = False) -> dict:
    """Loss (nats per token) and word-level perplexity at every exit.

    Exits are unembedded one at a time (not stacked) so that memory stays at one exit's
    logits. With ``max_batches`` only a prefix of the split is scored and the word count
    is scaled by the fraction of tokens seen.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    L = model.num_layers
    nll = torch.zeros(L, dtype=torch.float64)
    n_tokens = 0
    batches = eval_windows(tokens, seq_len, batch_size, max_batches)
    if progress:
        from tqdm import tqdm
        total = math.ceil((tokens.size - 1) / seq_len / batch_size)
        batches = tqdm(batches, total=max_batches or total, desc="eval", leave=False)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast(device, bf16):
            h = model.embed(x)
            for layer in range(L):
                h = model.run_layers(h, layer, layer + 1)
                logits = model.head(h).float()
                nll[layer] += F.cross_entropy(logits.flatten(0, 1), y.flatten(),
                                              reduction="sum").item()
        n_tokens += y.numel()
    model.train(was_training)
    scored_words = words * n_tokens / max(tokens.size - 1, 1)
    loss = (nll / n_tokens).tolist()
    word_ppl = [math.exp(min(v / scored_words, 700.0)) for v in nll.tolist()]
    return {"loss": loss, "word_ppl": word_ppl, "tokens": n_tokens}
