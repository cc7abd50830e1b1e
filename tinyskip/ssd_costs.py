"""What one round of self-speculative decoding costs, call by call, and the acceptance
it would need to beat full decoding through the same steps (compiled or eager).

A greedy SSD round with k drafts at exit E makes (decode/ssd.py) k draft calls (blocks
[0, E) and the draft head), one blocks-only call (blocks [0, E) on the last draft) and one
verify call (blocks [E, L) and the full head at width k + 1). It commits 1 + a tokens, a the accepted drafts, so against one full step
per token it runs at

    speedup = (1 + k * acceptance) * full / (k * draft + blocks + verify(k + 1))

when every round drafts all k (no adaptive stop, no end of budget) and the loop's own
Python is free. ``round_costs`` measures the calls; the acceptance that would reach a
target speedup follows from the same line, and is more than 1 (no acceptance reaches it)
where the round's calls cost too much.
"""

from __future__ import annotations

import torch

from .decode.steps import Steps, positions
from .exits import ExitHead
from .model import Transformer
from .unit_costs import median_seconds


@torch.no_grad()
def round_costs(model: Transformer, steps: Steps, pos: int, layers: list[int], ks: list[int],
                draft_ids: torch.Tensor | None = None, reps: int = 50) -> dict:
    """Median seconds of each call a greedy SSD round makes through ``steps`` at position
    ``pos``: the full step, and per exit E the draft step (through ``draft_ids``' restricted
    head when given), the blocks-only step and the verify step at every width 2..max(k)+1.
    The calls are made exactly as decode/ssd.py makes them, so a compiled ``steps`` that
    decoded before reuses its graphs."""
    dev = model.lm_head.weight.device
    L, d = model.num_layers, model.config.hidden_size
    # The cache a generation at ``pos`` decodes with (at least 256 slots; decode/steps.py).
    size = min(model.config.max_position_embeddings, max(256, pos + max(ks) + 1))
    cache = model.new_cache(1, size, dev)
    tok = torch.zeros(1, 1, dtype=torch.long, device=dev)
    at = positions(pos, 1, dev)
    full, draft = ExitHead(model), ExitHead(model, draft_ids)
    median = lambda fn: median_seconds(fn, reps, dev)
    out = {"full": median(lambda: steps.token(tok, L, cache, at, full, ())), "ks": list(ks),
           "compiled": steps.compiled, "exits": {}}
    for E in layers:
        costs = {"draft": median(lambda: steps.token(tok, E, cache, at, draft, ())),
                 "blocks": median(lambda: steps.blocks(tok, E, cache, at, (E,))), "verify": {}}
        for w in range(2, max(ks) + 2):
            h = torch.randn(1, w, d, device=dev, dtype=cache.k[0].dtype)
            costs["verify"][w] = median(lambda: steps.states(h, E, L, cache, positions(pos, w, dev),
                                                           full, ()))
        out["exits"][E] = costs
    return out


def round_seconds(costs: dict, E: int, k: int) -> float:
    """One full round at exit E with k drafts: k drafts, the blocks-only call, the verify."""
    c = costs["exits"][E]
    return k * c["draft"] + c["blocks"] + c["verify"][k + 1]


def acceptance_needed(costs: dict, E: int, k: int, speedup: float) -> float:
    """The acceptance (accepted / drafted) at which rounds of k drafts at exit E reach
    ``speedup`` over full decoding (> 1: no acceptance does)."""
    tokens_per_round = speedup * round_seconds(costs, E, k) / costs["full"]
    return (tokens_per_round - 1) / k


def format_round_costs(costs: dict) -> str:
    """A Markdown table: per (E, k) the round's calls in microseconds, the acceptance that
    breaks even with full decoding and the one that reaches 1.5x, beside the
    acceptance the benchmark's rows measured (``costs["measured"]``: [E, k, acceptance])."""
    us = lambda s: f"{s * 1e6:.0f}"
    measured = {(E, k): a for E, k, a in costs.get("measured", [])}
    kind = "compiled" if costs["compiled"] else "eager"
    lines = [f"SSD rounds through the {kind} steps; one full step {us(costs['full'])} us",
             "| E | k | draft us | blocks us | verify us | round us | acceptance for 1.0x "
             "| for 1.5x | measured |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for E, c in costs["exits"].items():
        for k in costs["ks"]:
            got = measured.get((E, k))
            lines.append(f"| {E} | {k} | {us(c['draft'])} | {us(c['blocks'])} | "
                         f"{us(c['verify'][k + 1])} | {us(round_seconds(costs, E, k))} | "
                         f"{acceptance_needed(costs, E, k, 1.0):.2f} | "
                         f"{acceptance_needed(costs, E, k, 1.5):.2f} | "
                         f"{'-' if got is None else f'{got:.2f}'} |")
    return "\n".join(lines)
