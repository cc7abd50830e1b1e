"""Full and static-exit decoding with the static KV cache.

``mode=full`` is static exit at the last exit: both run blocks [0, exit_layer) for
every token, so a static exit never touches the deeper layers' cache.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from ..config import UserError
from ..model.exits import ExitHead
from ..model.transformer import Transformer
from .sampling import SamplingConfig, choose
from .stats import DecodeStats, Generation
from .steps import (Steps, StopIds, budget, new_cache, positions, prefill, row_budgets,
                    row_positions, stop_set, sync, truncate_at_eos)


def check_exit_layer(exit_layer: Optional[int], num_layers: int) -> None:
    """A static exit runs blocks [0, E): E in 1..L."""
    if not 1 <= (exit_layer or 0) <= num_layers:
        raise UserError(f"exit_layer={exit_layer}: must be in 1..{num_layers} (the number of "
                        "blocks to run)")


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int,
             exit_layer: Optional[int] = None, sampling: SamplingConfig = SamplingConfig(),
             eos_id: StopIds = None, generator: Optional[torch.Generator] = None,
             steps: Optional[Steps] = None, lengths: Optional[torch.Tensor] = None) -> Generation:
    """Full (exit_layer = L, the default) or static-exit decoding of prompt (B, T).

    Rows of equal lengths share positions. With ``lengths`` (B,), rows are prompts of
    their own lengths, right-padded (``ragged_batch``): each decodes at its own positions
    (per-row positions and masks), with its own budget. Stops when every row has produced
    a stop token or used its budget (``max_new_tokens``, capped by the context).
    """
    L = model.num_layers
    E = L if exit_layer is None else exit_layer
    check_exit_layer(E, L)
    B, T = prompt.shape
    if lengths is not None and bool((lengths == T).all()):
        lengths = None                    # equal lengths: the shared positions' steps
    if lengths is None:
        n_new = budget(model, prompt, max_new_tokens)
        budgets = [n_new] * B
    else:
        budgets = row_budgets(model, lengths, max_new_tokens)
        n_new = max(budgets)
        # (B,) the last position each row may hold, and the step after which it is done
        last = lengths + torch.tensor(budgets, device=lengths.device) - 1
        spent = torch.tensor(budgets, device=lengths.device)
    step = steps or Steps(model)
    head = ExitHead(model)
    cache = new_cache(model, prompt, n_new)
    stats = DecodeStats()
    # Only the module at E (if any) is read, and its own forward writes its keys and
    # values: the modules passed on the way need none.
    logits = prefill(model, prompt, cache, E, stats, exit_kv=(), lengths=lengths)
    through_module = model.exit_module(E) is not None      # (looked up once, not per token)
    out = torch.empty(B, n_new, dtype=torch.long, device=prompt.device)
    stops = torch.tensor(sorted(stop_set(eos_id)), dtype=torch.long, device=prompt.device)
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    watch = bool(stops.numel()) or lengths is not None      # can rows end before n_new?
    t0, compiling = time.perf_counter(), step.compile_s
    n = 0
    for n in range(1, n_new + 1):
        tok = choose(logits, sampling, generator)                       # (B,)
        out[:, n - 1] = tok
        stats.add_layers(E)             # the token's own pass (the first one's is in prefill)
        stats.add_head(module=through_module)
        if lengths is not None:
            done |= spent <= n
        if stops.numel():
            done |= torch.isin(tok, stops)
        if watch and bool(done.all()):
            break
        if n == n_new:
            break
        pos = positions(T + n - 1, 1, prompt.device) if lengths is None else \
            row_positions(lengths + n - 1, 1, last)                   # (B, 1): each row's own
        logits = step.token(tok[:, None], E, cache, pos, head, exit_kv=())[1][:, -1]
    sync(prompt.device)
    stats.compile_s = step.compile_s - compiling
    stats.decode_s = time.perf_counter() - t0 - stats.compile_s
    rows = [truncate_at_eos(r[:b], eos_id)[0] for r, b in zip(out[:, :n].tolist(), budgets)]
    stats.new_tokens = sum(len(r) for r in rows)
    stats.add_exit(E, stats.new_tokens)
    if B > 1:     # every row ran every step: a batched call counts once per row
        stats.calls = {k: v * B for k, v in stats.calls.items()}
    return Generation(rows, stats)
