"""What one round of self-speculative decoding costs, call by call, and the acceptance
it would need to beat full decoding through the same steps (compiled or eager).

A greedy SSD round with k drafts at exit E makes (decode/ssd.py) k draft calls (blocks
[0, E) and the draft head), one blocks-only call (blocks [0, E) on the last draft) and one
verify call (blocks [E, L) and the full head at width k + 1). It commits 1 + a tokens, a
the accepted drafts, so against one full step per token it runs at

    speedup = (1 + k * acceptance) * full / (k * draft + blocks + verify(k + 1))

when every round drafts all k (no adaptive stop, no end of budget) and the loop's own
Python is free. ``round_costs`` measures the calls; the acceptance that would reach a
target speedup follows from the same line, and is more than 1 (no acceptance reaches it)
where the round's calls cost too much.
"""

from __future__ import annotations

import torch

from ..decode.steps import Steps, cache_size, positions
from ..model.exits import ExitHead
from ..model.transformer import Transformer
from ..runtime import median_seconds


@torch.no_grad()
def round_costs(model: Transformer, steps: Steps, pos: int, needed: int, layers: list[int],
                ks: list[int], draft_ids: torch.Tensor | None = None, reps: int = 50) -> dict:
    """Median seconds of each call a greedy SSD round makes through ``steps`` at position
    ``pos`` of a generation of ``needed`` positions: ``full`` (the full step) and, per exit
    E, ``draft:E`` (through ``draft_ids``' restricted head when given), ``blocks:E`` and
    ``verify:E:w`` at the widths w = k + 1. The calls are made as decode/ssd.py makes them,
    on a cache of the generation's size, so compiled steps that decoded reuse their graphs.
    """
    dev = model.lm_head.weight.device
    L, d = model.num_layers, model.config.hidden_size
    cache = model.new_cache(1, cache_size(model, needed), dev)
    tok = torch.zeros(1, 1, dtype=torch.long, device=dev)
    full, draft = ExitHead(model), ExitHead(model, draft_ids)
    median = lambda fn: median_seconds(fn, reps, dev)
    out = {"layers": list(layers), "ks": list(ks), "compiled": steps.compiled,
           "full": median(lambda: steps.token(tok, L, cache, positions(pos, 1, dev), full, ()))}
    for E in layers:
        out[f"draft:{E}"] = median(lambda: steps.token(tok, E, cache, positions(pos, 1, dev),
                                                       draft, ()))
        out[f"blocks:{E}"] = median(lambda: steps.blocks(tok, E, cache, positions(pos, 1, dev),
                                                         (E,)))
        for w in sorted({k + 1 for k in ks}):
            h = torch.randn(1, w, d, device=dev, dtype=cache.k[0].dtype)
            out[f"verify:{E}:{w}"] = median(lambda: steps.states(h, E, L, cache,
                                                                 positions(pos, w, dev), full, ()))
    return out


def round_seconds(costs: dict, E: int, k: int) -> float:
    """One full round at exit E with k drafts: k drafts, the blocks-only call, the verify."""
    return k * costs[f"draft:{E}"] + costs[f"blocks:{E}"] + costs[f"verify:{E}:{k + 1}"]


def acceptance_needed(costs: dict, E: int, k: int, speedup: float) -> float:
    """The acceptance (accepted / drafted) at which rounds of k drafts at exit E reach
    ``speedup`` over full decoding (> 1: no acceptance does)."""
    tokens_per_round = speedup * round_seconds(costs, E, k) / costs["full"]
    return (tokens_per_round - 1) / k


def measured_acceptance(rows: list[dict], compiled: bool, draft_vocab: bool) -> list[list]:
    """[E, k, acceptance] of the benchmark's greedy SSD rows priced alike: through the same
    steps, with or without the draft vocabulary, never adaptive (its rounds stop early) nor
    with prompt-lookup drafts (their rounds cost another price), nor choosing their exit."""
    return [[r["draft_layer"], r["k"], r["acceptance"]] for r in rows
            if r["compiled"] == compiled and r["mode"].startswith("ssd")
            and r.get("choose") != "del" and not r["adaptive_threshold"] and not r.get("ngram")
            and bool(r["draft_vocab"]) == draft_vocab]


def format_round_costs(costs: dict) -> str:
    """A Markdown table: per (E, k) the round's calls in microseconds, the acceptance that
    breaks even with full decoding and the one that reaches 1.5x ("none" above 1), beside
    the acceptance the benchmark's rows measured (``costs["measured"]``)."""
    us = lambda s: f"{s * 1e6:.0f}"
    need = lambda a: f"{a:.2f}" if a <= 1 else f"none ({a:.2f})"
    measured = {(E, k): a for E, k, a in costs.get("measured", [])}
    kind = "compiled" if costs["compiled"] else "eager"
    lines = [f"SSD rounds through the {kind} steps; one full step {us(costs['full'])} us",
             "| E | k | draft us | blocks us | verify us | round us | acceptance for 1.0x "
             "| for 1.5x | measured |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for E in costs["layers"]:
        for k in costs["ks"]:
            got = measured.get((E, k))
            lines.append(f"| {E} | {k} | {us(costs[f'draft:{E}'])} | {us(costs[f'blocks:{E}'])} | "
                         f"{us(costs[f'verify:{E}:{k + 1}'])} | {us(round_seconds(costs, E, k))} | "
                         f"{need(acceptance_needed(costs, E, k, 1.0))} | "
                         f"{need(acceptance_needed(costs, E, k, 1.5))} | "
                         f"{'-' if got is None else f'{got:.2f}'} |")
    return "\n".join(lines)
