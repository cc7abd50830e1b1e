"""What each lever of the compiled one-token step buys, measured side by side, and the
floor: the step's matrix work alone.

    eager                      the step as PyTorch runs it op by op
    torch.compile              inductor's graph, with an external GEMM call per projection
                               and a Python wrapper calling the kernels
    + products in the graph    one-row products written as multiply-and-sum (linear), so
                               inductor generates and fuses them
    + one-query attention      attention of the one query written as reductions
                               (one_query_attention) instead of SDPA's kernel
    + C++ wrapper              the graph's kernel calls compiled too (what ``compile=true``
                               runs on the CPU)

The floor is every weight of the blocks and the head applied to one token in one compiled
graph (nothing else: no norms, RoPE, attention, cache or bookkeeping): what the step
would cost if everything between its matrix-vector products were free.
"""

from __future__ import annotations

import torch

from ..decode.steps import cache_size
from ..model.kernels import Kernels, Linear
from ..model.transformer import Transformer
from ..runtime import median_seconds
from .bandwidth import module_bytes

# (name, products in the graph, attention in the graph, C++ wrapper); None: eager.
LEVERS = [("eager", None, None, None), ("torch.compile", False, False, False),
          ("+ products in the graph", True, False, False),
          ("+ one-query attention in the graph", True, True, False),
          ("+ C++ wrapper", True, True, True)]


@torch.no_grad()
def step_levers(model: Transformer, pos: int, needed: int, reps: int = 50) -> dict:
    """Median seconds of a one-token full step (blocks, head, argmax) at position ``pos``
    of a generation of ``needed`` positions, under each lever in turn, and of the floor.
    Each compiled variant is its own graph (its ``Kernels`` are constants of the trace),
    compiled before it is timed."""
    dev = model.lm_head.weight.device
    cache = model.new_cache(1, cache_size(model, needed), dev)    # the generation's own
    tok = torch.zeros(1, 1, dtype=torch.long, device=dev)
    input_pos = torch.tensor([pos], device=dev)

    def step_with(kernels: Kernels):
        def step(tok, input_pos):
            h = model.run_layers(model.embed(tok), 0, model.num_layers, cache, input_pos,
                                 exit_kv=(), kernels=kernels)   # as full decoding runs it
            return model.head(h, kernels).argmax(-1)
        return step

    mats = [m for m in model.modules() if isinstance(m, Linear)]
    dtype = model.embed_tokens.weight.dtype
    x = {m.in_features: torch.randn(1, 1, m.in_features, device=dev, dtype=dtype) for m in mats}

    def matrix_work():
        return [m(x[m.in_features]) for m in mats]

    out = {"levers": {}, "weight_bytes": sum(module_bytes(m) for m in mats)}
    try:
        for name, gemv, attention, cpp in LEVERS:
            fn = step_with(Kernels())
            if gemv is not None:
                torch._dynamo.reset()
                fn = torch.compile(step_with(Kernels(gemv, attention)), fullgraph=True,
                                   dynamic=False,
                                   options={"cpp_wrapper": cpp} if dev.type == "cpu" else None)
            out["levers"][name] = median_seconds(lambda: fn(tok, input_pos), reps, dev)
        torch._dynamo.reset()
        floor = torch.compile(matrix_work, fullgraph=True, dynamic=False,
                              options={"cpp_wrapper": True} if dev.type == "cpu" else None)
        out["floor"] = median_seconds(floor, reps, dev)
    finally:
        torch._dynamo.reset()
    return out


def format_levers(res: dict) -> str:
    """The levers as a Markdown table: time per token, speedup over eager, and the floor."""
    lv, floor = res["levers"], res["floor"]
    eager = lv["eager"]
    lines = ["| one-token full step | us | vs eager | x the floor |", "|---|---:|---:|---:|"]
    for name, s in lv.items():
        lines.append(f"| {name} | {s * 1e6:.0f} | {eager / s:.2f}x | {s / floor:.1f} |")
    lines.append(f"| floor: the matrix work alone ({res['weight_bytes'] / 2**20:.1f} MiB of "
                 f"weights, one compiled graph) | {floor * 1e6:.0f} | {eager / floor:.2f}x | 1.0 |")
    return "\n".join(lines)
