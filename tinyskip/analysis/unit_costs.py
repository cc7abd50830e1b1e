"""What one block, one head call, one exit-module call and one whole step cost on this
machine, measured: the unit prices the benchmark predicts each mode's speed from, and the
step's matrix work alone, the floor a step would reach if everything between the matmuls
were free."""

from __future__ import annotations

import statistics

import torch

from ..model.kernels import Linear
from ..model.transformer import Transformer
from ..runtime import median_seconds, seconds


# Seconds one measurement may take, and the fewest reps it takes where a call is slow.
# At a fixed 100 reps, the unit costs of a real model (a block pass of tens of ms, every
# width up to 2 x 7) took about 6 minutes; a tiny model's calls stay at the full count.
BUDGET_S = 2.0
MIN_REPS = 10


def budgeted_reps(fn, reps: int, device: torch.device, calls_per_rep: int = 1) -> int:
    """``reps``, or as many reps of ``calls_per_rep`` calls of ``fn`` as fit in
    ``BUDGET_S`` where that is fewer (never fewer than ``MIN_REPS``, nor than ``reps``
    where it is smaller still). One warm-up call, then one timed call, decide."""
    fn()
    one = seconds(fn, device) * calls_per_rep
    fit = int(BUDGET_S / one) if one > 0 else reps
    return min(reps, max(MIN_REPS, fit))


def median_extra_seconds(fn_with, fn_without, reps: int, device: torch.device) -> float:
    """Median over ``reps`` of what ``fn_with()`` costs beyond ``fn_without()``, timed
    back to back in each rep: the machine's drift between two separate medians (here
    often larger than a head call) cancels out of each difference. Each rep times the two
    in the order with, without, without, with, so that what the first call of a pair pays
    (or saves) falls on both alike."""
    def rep() -> float:
        first = seconds(fn_with, device) - seconds(fn_without, device)
        second = -seconds(fn_without, device) + seconds(fn_with, device)
        return (first + second) / 2

    for _ in range(5):
        fn_with(), fn_without()
    return max(statistics.median(rep() for _ in range(reps)), 0.0)


@torch.no_grad()
def unit_costs(model: Transformer, pos: int, max_width: int, reps: int = 100) -> dict:
    """Median seconds of one block call, one head call and (on a model with exit modules)
    one exit-module call on 1..max_width positions, and of a whole one-token full step
    through the decoders' API.

    Blocks are timed cycling through all L (so weights stream from memory as in a real
    step) and the head right after them: ``head:w`` is (L blocks + head) - (L blocks),
    timed back to back, which charges the head with the cache misses its weight causes.
    ``module:w`` is the module alone on a hidden state (a difference of two calls is
    noise at its size). What a full step costs beyond L blocks and the head (embedding,
    attention set-up, argmax, Python) is the bookkeeping overhead.
    """
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    L = model.num_layers
    cache = model.new_cache(1, pos + max_width)
    x = torch.zeros(1, 1, dtype=torch.long, device=dev)

    timed = lambda fn: median_seconds(fn, budgeted_reps(fn, reps, dev), dev)

    def blocks(h, ctx):
        for layer in model.layers:
            h = layer(h, ctx)
        return h

    costs = {}
    for w in range(1, max_width + 1):
        h0 = model.embed(torch.zeros(1, w, dtype=torch.long, device=dev))
        ctx = model.context(pos, w, cache, 1)
        t_blocks = timed(lambda: blocks(h0, ctx))
        costs[f"layer:{w}"] = t_blocks / L
        with_head = lambda: model.head(blocks(h0, ctx))
        costs[f"head:{w}"] = median_extra_seconds(
            with_head, lambda: blocks(h0, ctx),
            budgeted_reps(with_head, reps, dev, calls_per_rep=4), dev)   # 4 calls a rep
        if model.exit_modules is not None:     # the modules are of one kind: price the first
            module = model.exit_module(model.exit_modules.exit_layers[0])
            # Timed alone: even back to back, a difference against the blocks' time (as
            # the head is priced) buries a small module in noise (a norm module on
            # l12_d256: 58-120 us that way, 16-17 us alone).
            costs[f"module:{w}"] = timed(lambda: module(h0, ctx))
    # The step's matrix work alone: every weight of the blocks and the head applied to one
    # token, nothing else (no norms, RoPE, attention or bookkeeping): the floor the step's
    # time would reach if everything between the matmuls were free.
    mats = [m for layer in model.layers for m in layer.modules()
            if isinstance(m, Linear)] + [model.lm_head]
    vecs = {m.in_features: torch.randn(1, m.in_features, device=dev, dtype=dtype) for m in mats}
    costs["matmuls"] = timed(lambda: [m(vecs[m.in_features]) for m in mats])
    h1 = model.embed(x)
    costs["kv:1"] = timed(lambda: model.propagate_kv(h1, 0, L, cache, pos)) / L
    step = timed(lambda: model.head(model.run_layers(model.embed(x), 0, L, cache, pos, ())[:, -1])
                 .argmax(-1))                        # as full decoding runs it: no module keys
    costs["step"] = step
    costs["overhead"] = (step - L * costs["layer:1"] - costs["head:1"]) / step
    return costs
