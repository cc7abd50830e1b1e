"""Weight-only int8: the backbone's projections and head stored as int8 with one scale per
output row, so that a decoding step, bound by reading the weights, reads a byte per weight.

Each row w of a weight (out, in) becomes q = round(w / s) in [-127, 127] with
s = max|w| / 127 (symmetric, per row, as gpt-fast's and torchao's weight-only int8):
the error of an entry is at most s / 2. Activations, norms, the embedding table (one
row read per token) and the KV cache stay in the model's dtype; products widen the int8
weight where they multiply (``kernels.int8_linear``). Exit modules stay in the model's
dtype too: small beside the backbone, and trained in it.
"""

from __future__ import annotations

import torch
from torch import nn

from .kernels import Linear
from .transformer import Transformer


def module_bytes(module: nn.Module) -> int:
    """The module's weights as stored: int8 ones with their scales."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (out, in) -> int8 (out, in) and fp32 scales (out,), weight ~ q * s[:, None]."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    return q, scale


@torch.no_grad()
def quantize_int8(model: Transformer) -> Transformer:
    """Make every block projection and the head int8, in place (a head tied to the
    embedding gets its own int8 copy; the embedding keeps the float table). Inference only:
    the int8 weights take no gradient."""
    dtype = model.embed_tokens.weight.dtype
    for m in [*model.layers.modules(), model.lm_head]:
        if isinstance(m, Linear) and m.weight_scale is None:
            q, scale = int8_rows(m.weight)
            m.weight = nn.Parameter(q, requires_grad=False)
            # In the model's dtype, as gpt-fast keeps them: ATen's int8 kernel takes scales
            # in the activations' dtype, and inductor's lowering of it inside a graph
            # (SSD's verify) fails on a scale converted in the graph. A bf16 scale rounds a
            # row by at most 2^-9, below the int8 rounding of its entries (1/254).
            m.weight_scale = scale.to(dtype)
    return model
