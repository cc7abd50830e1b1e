"""The pieces of a Llama block, with Hugging Face's parameter names: RoPE ("rotate half",
Llama 3 scaling), RMSNorm, grouped-query attention over a static KV cache, SwiGLU MLP."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .kernels import (DECODE_KERNELS, Kernels, Linear, causal_attention, one_query_attention,
                      one_row_compiled)
from .kv_cache import KVCache


def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """Rotary inverse frequencies (head_dim/2,), with Llama 3 scaling when configured."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (
        torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    # Llama 3: long wavelengths are slowed by `factor`, short ones kept, and the band in
    # between is interpolated smoothly between the two.
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_freq_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (max_position_embeddings, head_dim), Hugging Face "rotate half" layout."""
    inv_freq = rope_inv_freq(cfg, device)
    pos = torch.arange(cfg.max_position_embeddings, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)                       # (S, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)                  # (S, hd)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (as Hugging Face does), scale in the input dtype.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)


@dataclass
class AttnContext:
    """What every layer of one ``run_layers`` call shares: positions, RoPE rows, mask."""

    # Shared positions / per-row positions (B, T) (see ``Transformer.context``):
    cos: torch.Tensor                     # (T, hd) / (B, 1, T, hd) RoPE rows of the positions
    sin: torch.Tensor                     # (T, hd) / (B, 1, T, hd)
    input_pos: torch.Tensor               # (T,) / (B, T) absolute positions of the tokens
    cache: Optional[KVCache] = None
    mask: Optional[torch.Tensor] = None   # (T, S) / (B, 1, T, S) bool over the whole cache,
                                          # True = may attend
    kernels: Kernels = DECODE_KERNELS


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.layer_idx = layer_idx
        self.dropout = cfg.attention_dropout
        self.q_proj = Linear(d, self.n_heads * hd)
        self.k_proj = Linear(d, self.n_kv * hd)
        self.v_proj = Linear(d, self.n_kv * hd)
        self.o_proj = Linear(self.n_heads * hd, d)

    def kv(self, x: torch.Tensor, ctx: AttnContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values (B, n_kv, T, hd) of x (B, T, d)."""
        B, T, _ = x.shape
        # (B, T, n_kv*hd) -> (B, n_kv, T, hd)
        k = self.k_proj(x, ctx.kernels).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x, ctx.kernels).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = ctx.cos.to(k.dtype), ctx.sin.to(k.dtype)
        return k * cos + rotate_half(k) * sin, v

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        B, T, _ = x.shape
        # (B, T, H*hd) -> (B, H, T, hd)
        q = self.q_proj(x, ctx.kernels).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        cos, sin = ctx.cos.to(q.dtype), ctx.sin.to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k, v = self.kv(x, ctx)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_idx, ctx.input_pos, k, v)
            if ctx.kernels.attention_in_graph and one_row_compiled(x):
                y = one_query_attention(q, k, v, ctx.mask)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask,
                                                   enable_gqa=self.n_kv != self.n_heads)
        else:
            y = causal_attention(q, k, v, self.dropout if self.training else 0.0)
        # (B, H, T, hd) -> (B, T, H*hd) -> (B, T, d)
        # (The width spelt out: a call on no rows, see Transformer.forward, has no -1 to infer.)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim),
                           ctx.kernels)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, kernels: Kernels = DECODE_KERNELS) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x, kernels)) * self.up_proj(x, kernels),
                              kernels)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.dropout = cfg.hidden_dropout

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        x = x + self._drop(self.self_attn(self.input_layernorm(x), ctx))
        return x + self._drop(self.mlp(self.post_attention_layernorm(x), ctx.kernels))

    def _drop(self, branch: torch.Tensor) -> torch.Tensor:
        # Checked here rather than left to F.dropout: decoding steps pay no call for it.
        if self.training and self.dropout > 0:
            return F.dropout(branch, self.dropout, training=True)
        return branch
