"""What a decoding step reads from memory, and how fast this machine reads.

A one-token step on a model larger than the caches is bound by reading its weights: its
floor is the bytes it reads over the memory bandwidth. ``bytes_per_token`` counts them
from a generation's counted calls (``DecodeStats.calls``): each block call reads the
block's weights once, whatever its width, and the block's whole KV cache buffers
(attention reads every preallocated slot under a mask); each head call reads the head (a
call over a draft vocabulary its share); each exit-module call the module; each of DEE's
propagations into a skipped block its norm and key and value projections. The bench
divides by the time per token for the achieved bandwidth, next to ``StreamRead``,
a plain read of a buffer far larger than the caches, measured in the same run. Bytes count
every new token's pass as tokens/s counts every new token, though the first comes from the
prefill, outside the timed decoding: both read high by n/(n-1), 1.6% at 64 new tokens.
"""

from __future__ import annotations

import statistics

import torch

from ..model.quantize import module_bytes
from ..model.transformer import Transformer
from ..runtime import median_seconds


def call_bytes(model: Transformer, slots: int) -> dict[str, int]:
    """Bytes one call of each kind reads, with a KV cache of ``slots`` positions."""
    cfg = model.config
    elem = model.embed_tokens.weight.element_size()
    kv = 2 * slots * cfg.num_key_value_heads * cfg.head_dim * elem     # keys and values
    block = model.layers[0]
    out = {"layer": module_bytes(block) + kv,
           "head": module_bytes(model.lm_head) + module_bytes(model.norm),
           # DEE's state propagation into a skipped block: its norm and key and value
           # projections read, one slot of its cache written.
           "kv": sum(module_bytes(m) for m in (block.input_layernorm, block.self_attn.k_proj,
                                         block.self_attn.v_proj))}
    if model.exit_modules is not None:         # one kind of module: price the first
        module = model.exit_module(model.exit_modules.exit_layers[0])
        out["module"] = module_bytes(module) + (kv if module.has_attention else 0)
    return out


def bytes_per_token(calls: dict[str, float], new_tokens: int, model: Transformer,
                    slots: int) -> float:
    """Bytes read per new token by the counted calls of a generation (or a sum of them)."""
    price = call_bytes(model, slots)
    return sum(count * price[key.split(":")[0]] for key, count in calls.items()) / new_tokens


class StreamRead:
    """A streaming read of ``mib`` MiB of fp32 (a sum, far larger than any cache): the
    floor's denominator. The machine's read speed drifts (other tenants, frequency), so the
    bench takes ``sample()`` between its rows, prompt by prompt, and reports the median
    and the range of those samples rather than one reading."""

    def __init__(self, device: torch.device, mib: int = 1024):
        self.device = device
        self.buf = torch.ones(mib * 2 ** 20 // 4, dtype=torch.float32, device=device)
        self.samples: list[float] = []

    @torch.no_grad()
    def sample(self, reps: int = 3) -> float:
        """Bytes per second, the median of ``reps`` reads; kept in ``samples``."""
        bps = self.buf.numel() * 4 / median_seconds(lambda: self.buf.sum(), reps, self.device)
        self.samples.append(bps)
        return bps

    def summary(self) -> dict:
        """GB/s: the samples' median (what the % columns divide by), lowest and highest."""
        gb = sorted(s / 1e9 for s in self.samples)
        return {"stream_gb_per_s": statistics.median(gb), "stream_gb_per_s_min": gb[0],
                "stream_gb_per_s_max": gb[-1], "stream_samples": len(gb)}
