"""The steps every decoding loop is made of: input checks, the cache, prefill, and a
token's pass through a range of blocks. Loops call these, never model internals."""

from __future__ import annotations

import time
from typing import Iterable, Optional, Union

import torch

from ..cache import KVCache
from ..config import UserError
from ..model import Transformer
from .stats import DecodeStats

# A stop token, or several (Llama 3 instruct models end a turn with any of a set).
StopIds = Union[int, Iterable[int], None]


def stop_set(eos_id: StopIds) -> frozenset[int]:
    if eos_id is None:
        return frozenset()
    return frozenset([eos_id]) if isinstance(eos_id, int) else frozenset(eos_id)


def check_prompt(model: Transformer, prompt: torch.Tensor) -> None:
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise UserError("the prompt is empty: give at least one token")
    ctx = model.config.max_position_embeddings
    if prompt.shape[1] >= ctx:
        raise UserError(f"the prompt has {prompt.shape[1]} tokens, longer than the context "
                        f"allows ({ctx - 1} tokens + 1 generated)")


def check_max_new_tokens(n: int) -> None:
    if n < 1:
        raise UserError(f"max_new_tokens={n}: must be >= 1")


def budget(model: Transformer, prompt: torch.Tensor, max_new_tokens: int) -> int:
    """New tokens a generation may produce: checked, and capped by the context."""
    check_prompt(model, prompt)
    check_max_new_tokens(max_new_tokens)
    return min(max_new_tokens, model.config.max_position_embeddings - prompt.shape[1])


def new_cache(model: Transformer, prompt: torch.Tensor, steps: int) -> KVCache:
    dtype = next(model.parameters()).dtype
    return KVCache(model.config, prompt.shape[0], prompt.shape[1] + steps, prompt.device, dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill(model: Transformer, prompt: torch.Tensor, cache: KVCache, end_layer: int,
            stats: DecodeStats) -> torch.Tensor:
    """Run blocks [0, end_layer) over the prompt; returns the exit logits (B, V) of its last token."""
    t0 = time.perf_counter()
    h = model.run_layers(model.embed(prompt), 0, end_layer, cache, 0)
    logits = model.head(h[:, -1])
    sync(prompt.device)
    stats.prompt_tokens = prompt.shape[1]
    stats.prefill_s = time.perf_counter() - t0
    return logits


def token_pass(model: Transformer, tok: torch.Tensor, start: int, end: int, cache: KVCache,
               pos: int) -> torch.Tensor:
    """Blocks [start, end) on tokens (B,) at position pos (start = 0: from their embedding,
    else ``tok`` is already the (B, d) hidden state after ``start`` blocks) -> (B, d)."""
    h = model.embed(tok[:, None]) if start == 0 else tok[:, None]      # (B, 1, d)
    return model.run_layers(h, start, end, cache, pos)[:, 0]


def truncate_at_eos(tokens: list[int], eos_id: StopIds) -> tuple[list[int], bool]:
    """Tokens up to and including the first stop token, and whether one was found."""
    stops = stop_set(eos_id)
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[: i + 1], True
    return tokens, False
