"""A Llama-style decoder with one shared exit head, driven layer by layer.

Parameter names follow Hugging Face's ``LlamaForCausalLM`` minus its ``model.`` prefix
(``embed_tokens``, ``layers.N.self_attn.q_proj``, ..., ``norm``, ``lm_head``), so the
Llama shim is a rename.

Exit E (1..L, blocks run) is the shared head (final ``norm`` + ``lm_head``) applied to
the *output* of block E-1, or, where exit modules are attached (exit_modules.py), the head
after the exit's module; exit L is the model's normal output. Decoders drive the model
through ``embed``, ``run_layers(h, start, end, cache, pos)`` and ``head`` /
``head_at(h, exit, ...)``; the training ``forward`` takes exits numbered the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, UserError
from .kv_cache import KVCache


class LayerIndexError(UserError, ValueError):
    """A layer index or range outside the model's blocks."""


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


@dataclass(frozen=True)
class Kernels:
    """How compiled one-row calls (decoding steps) on the CPU write their products
    (``linear``) and their attention (``one_query_attention``): as multiply-and-sum that
    inductor generates and fuses (True), or as calls to ATen's GEMM and SDPA kernels.
    Callers pass it down through ``run_layers`` / ``head``; it is read while a graph is
    traced, so each choice is its own graph. Decoding always uses ``DECODE_KERNELS``; the
    engine benchmark passes the others to measure what each buys."""

    products_in_graph: bool = True
    attention_in_graph: bool = True


DECODE_KERNELS = Kernels()


def _one_row_compiled(x: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() and x.dim() > 1 and x.shape[-2] == 1 and \
        x.device.type == "cpu"


def linear(x: torch.Tensor, weight: torch.Tensor, in_graph: bool = True) -> torch.Tensor:
    """x (..., in) @ weight (out, in).T -> (..., out).

    One row per sequence (a decoding step, x (B, 1, in)) inside a graph compiled for the
    CPU is written out as a multiply-and-sum: inductor then generates the matrix-vector
    product itself, vectorised and fused with its neighbours, instead of calling an
    external GEMM whose set-up costs more than the work at these sizes (a d128 projection
    is 16k multiply-adds). Everywhere else (eager, prefill, verify widths > 1, GPUs) it is
    ``F.linear``. ``in_graph=False`` keeps ``F.linear`` there too (see ``Kernels``).
    """
    if in_graph and _one_row_compiled(x):
        return (x.unsqueeze(-2) * weight).sum(-1)     # (..., 1, in) * (out, in) -> (..., out)
    return F.linear(x, weight)


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:
    """Attention of one query per sequence over the cache, as plain reductions.

    q (B, H, 1, hd); k, v (B, n_kv, S, hd), the cache's whole buffers; mask (1, S), True =
    may attend. What SDPA computes, written so that inductor fuses it into a few loops
    instead of calling SDPA's kernel, whose set-up outweighs one query's work.
    """
    B, H, _, hd = q.shape
    n_kv = k.shape[1]
    # Query heads grouped by the key/value head they share (head h reads kv head h // rep,
    # as Hugging Face's repeat_kv): (B, H, 1, hd) -> (B, n_kv, rep, 1, hd).
    q = q.reshape(B, n_kv, H // n_kv, 1, hd)
    scores = (q * k.unsqueeze(2)).sum(-1) * hd ** -0.5         # (B, n_kv, rep, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    p = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    y = (p.unsqueeze(-1) * v.unsqueeze(2)).sum(-2)            # (B, n_kv, rep, hd)
    return y.reshape(B, H, 1, hd)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     dropout: float = 0.0) -> torch.Tensor:
    """Causal self-attention of a whole sequence from position 0: q (B, H, T, hd); k, v
    (B, n_kv, T, hd) -> (B, H, T, hd).

    SDPA, except in bf16 on the CPU, where its flash kernel's backward is the slowest part
    of a training step (measured at d=128, T=128, fwd + bwd per block: 16.4 ms against
    5.8 ms for these explicit products and 8.4 ms for SDPA's own math backend).
    """
    H, n_kv = q.shape[1], k.shape[1]
    if not (q.device.type == "cpu" and q.dtype == torch.bfloat16):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout,
                                               enable_gqa=n_kv != H)
    if n_kv != H:       # query head h reads kv head h // rep, as Hugging Face's repeat_kv
        k, v = k.repeat_interleave(H // n_kv, dim=1), v.repeat_interleave(H // n_kv, dim=1)
    T = q.shape[2]
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)                 # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    p = torch.softmax(scores.masked_fill(~causal, float("-inf")).float(), dim=-1).to(q.dtype)
    if dropout > 0:
        p = F.dropout(p, dropout, training=True)
    return p @ v


class Linear(nn.Linear):
    """``nn.Linear`` without bias whose one-row calls take ``linear``'s compiled path."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor, kernels: Kernels = DECODE_KERNELS) -> torch.Tensor:
        return linear(x, self.weight, kernels.products_in_graph)


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

    cos: torch.Tensor                     # (T, hd) RoPE rows of the T positions
    sin: torch.Tensor                     # (T, hd)
    input_pos: torch.Tensor               # (T,) absolute positions of the tokens
    cache: Optional[KVCache] = None
    mask: Optional[torch.Tensor] = None   # (T, S) bool over the whole cache, True = may attend
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
            if ctx.kernels.attention_in_graph and _one_row_compiled(x):
                y = one_query_attention(q, k, v, ctx.mask)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask,
                                                   enable_gqa=self.n_kv != self.n_heads)
        else:
            y = causal_attention(q, k, v, self.dropout if self.training else 0.0)
        # (B, H, T, hd) -> (B, T, H*hd) -> (B, T, d)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1), ctx.kernels)


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


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        self.attach_exit_modules(None)
        # GPT-2 style: shrink the residual-branch outputs so the stream's variance stays
        # O(1) with depth.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, cfg.initializer_range / math.sqrt(2 * cfg.num_hidden_layers))

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, self.config.initializer_range)

    def reset_rope(self, device=None) -> None:
        """Recompute the RoPE tables (after building on the meta device)."""
        self.rope_cos, self.rope_sin = rope_tables(self.config, device)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def attach_exit_modules(self, modules, cast: bool = True) -> None:
        """Serve exits through ``modules`` (an ``ExitModules``; None: bare shared head),
        moved to the backbone's device and, with ``cast``, its dtype (training keeps fp32
        master weights under autocast instead).

        Kept outside the module tree on purpose: the backbone's state dict, weight hash,
        checkpoint and export stay the backbone's alone, and a frozen backbone is never
        copied into an exit-module file.
        """
        if modules is not None:
            w = self.embed_tokens.weight
            modules.to(w.device, w.dtype if cast else None)
        object.__setattr__(self, "exit_modules", modules)
        # Exits whose module attends: run_layers writes their keys and values (those its
        # caller's exit_kv names).
        object.__setattr__(self, "_kv_exits", frozenset(
            e for e in (modules.exit_layers if modules else []) if modules[e].has_attention))

    # -- the three calls decoders drive -------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, d) residual stream."""
        return self.embed_tokens(input_ids)

    def context(self, pos: Union[int, torch.Tensor], T: int, cache: Optional[KVCache] = None,
                batch_size: int = 1, kernels: Kernels = DECODE_KERNELS) -> AttnContext:
        """Shared attention state for T tokens at absolute positions pos..pos+T-1.

        ``pos`` is the first position (an int: checked against the cache) or the (T,)
        positions themselves (a tensor: compiled steps pass positions as data, so that a
        growing sequence never changes a traced constant). With a cache, attention reads
        the cache's full preallocated buffers under a mask by position: shapes stay static
        as the sequence grows, and stale entries past the query (rejected drafts) are masked.
        """
        if isinstance(pos, int):
            if cache is not None:
                cache.check(pos + T, batch_size)
            input_pos = torch.arange(pos, pos + T, device=self.rope_cos.device)
        else:
            input_pos = pos
        ctx = AttnContext(self.rope_cos[input_pos], self.rope_sin[input_pos], input_pos, cache,
                          kernels=kernels)
        if cache is not None:
            ctx.mask = cache.positions[None, :] <= input_pos[:, None]    # (T, S)
        return ctx

    def run_layers(self, h: torch.Tensor, start: int, end: int, cache: Optional[KVCache] = None,
                   pos: Union[int, torch.Tensor] = 0,
                   exit_kv: Optional[tuple[int, ...]] = None,
                   kernels: Kernels = DECODE_KERNELS) -> torch.Tensor:
        """Run blocks [start, end) on h (B, T, d) at absolute positions pos..pos+T-1
        (``pos``: see ``context``; ``kernels``: see ``Kernels``). ``exit_kv``: the exits whose attending modules get
        their keys and values written on the way (None: every one passed). A decoder
        writes only those it reads: DEE every exit, SSD its draft exit, full none, and
        static exit none (its own module writes them when it runs).

        Without a cache the call is a plain causal pass over positions 0..T-1. With one,
        each token attends to every cached position up to its own, so callers decode at
        consecutive positions.
        """
        self.check_range(start, end)
        ctx = self.context(pos, h.shape[1], cache, h.shape[0], kernels)
        for i in range(start, end):       # (slicing a ModuleList builds a new one: slow)
            h = self.layers[i](h, ctx)
            if cache is not None and i + 1 in self._kv_exits and \
                    (exit_kv is None or i + 1 in exit_kv):
                self.exit_modules[i + 1].write_kv(h, ctx)
        return h

    def propagate_kv(self, h: torch.Tensor, start: int, end: int, cache: KVCache,
                     pos: int) -> None:
        """Fill blocks [start, end)'s cache at positions pos.. from the hidden state h
        (B, T, d) that left earlier (CALM's state propagation): each block projects its own
        keys and values from h, as if h were its input."""
        self.check_range(start, end)
        ctx = self.context(pos, h.shape[1], cache, h.shape[0])
        for i in range(start, end):
            layer = self.layers[i]
            k, v = layer.self_attn.kv(layer.input_layernorm(h), ctx)
            cache.update(i, ctx.input_pos, k, v)
        # Deeper exits' modules attend over this position too (see exit_modules.py); the
        # module at ``start`` itself got its entry when block start-1 ran (DEE, its
        # decoder, writes every exit's module keys as it goes).
        for e in self._kv_exits:
            if start < e <= end:
                self.exit_modules[e].write_kv(h, ctx)

    def new_cache(self, batch_size: int, max_seq_len: int, device=None, dtype=None) -> KVCache:
        """A KV cache for this model: the L blocks' slots plus the attending exit modules'."""
        w = self.embed_tokens.weight
        slots = self.exit_modules.cache_slots if self.exit_modules is not None else 0
        return KVCache(self.config, batch_size, max_seq_len, device or w.device, dtype or w.dtype,
                       slots)

    def module_slots_after(self, exit: int) -> list[int]:
        """Cache slots of the attending exit modules deeper than ``exit``."""
        return [self.exit_modules[e].self_attn.layer_idx for e in sorted(self._kv_exits) if e > exit]

    def head(self, h: torch.Tensor, kernels: Kernels = DECODE_KERNELS) -> torch.Tensor:
        """The shared exit head: (..., d) hidden states -> (..., V) logits."""
        return self.lm_head(self.norm(h), kernels)

    def exit_state(self, h: torch.Tensor, exit: int, cache: Optional[KVCache] = None,
                   pos: Union[int, torch.Tensor] = 0) -> torch.Tensor:
        """What the head reads at exit ``exit`` (blocks run) from states h (B, T, d) at
        positions pos..: the exit's module output when it has one, else the final norm.
        Without a cache, h is a whole sequence from position 0 (causal attention)."""
        module = self.exit_module(exit)
        if module is None:
            return self.norm(h)
        ctx = self.context(pos, h.shape[1], cache, h.shape[0]) if module.has_attention else None
        return module(h, ctx)

    def exit_module(self, exit: int) -> Optional[nn.Module]:
        """The exit module at exit ``exit`` (blocks run), or None for a bare exit."""
        if self.exit_modules is None or exit not in self.exit_modules:
            return None
        return self.exit_modules[exit]

    def head_at(self, h: torch.Tensor, exit: int, cache: Optional[KVCache] = None,
                pos: Union[int, torch.Tensor] = 0) -> torch.Tensor:
        """Logits (B, T, V) at exit ``exit``, through its module when it has one."""
        return self.lm_head(self.exit_state(h, exit, cache, pos))

    def check_range(self, start: int, end: int) -> None:
        if not 0 <= start <= end <= self.num_layers:
            raise LayerIndexError(f"layer range [{start}, {end}) is outside the model's "
                                  f"blocks [0, {self.num_layers})")

    # -- training ---------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, exits: Optional[Sequence[int]] = None,
                layer_drop: Optional[Sequence[float]] = None,
                drop_draws: Optional[torch.Tensor] = None, head: bool = True) -> torch.Tensor:
        """Logits (n_exits, B, T, V) at ``exits`` (1..L, blocks run; default: exit L);
        with ``head=False``, what the shared ``lm_head`` would read instead (n_exits, B, T, d):
        the trainer's fused linear + cross-entropy takes those and never holds the logits.

        ``layer_drop`` gives one drop probability per block; in training each row of the
        batch skips block l with that probability (identity for that row, no rescaling),
        and the block runs on the kept rows only, so dropping saves compute. Row b drops
        block l when ``drop_draws[b, l]`` (uniforms (B, L), default fresh ones) < p_l: the
        trainer passes draws of the global batch so data-parallel ranks drop as one process.
        """
        L = self.num_layers
        exits = sorted(set(exits)) if exits is not None else [L]
        for e in exits:
            if not 1 <= e <= L:
                raise LayerIndexError(f"exit {e} is outside 1..{L}")
        if layer_drop is not None and len(layer_drop) != L:
            raise ValueError(f"layer_drop has {len(layer_drop)} probabilities for {L} blocks")
        h = self.embed(input_ids)
        if self.training and self.config.embedding_dropout > 0:
            h = F.dropout(h, self.config.embedding_dropout, training=True)
        ctx = self.context(0, input_ids.shape[1])
        states, wanted = [], set(exits)
        for i, layer in enumerate(self.layers[: exits[-1]]):
            p = layer_drop[i] if (layer_drop is not None and self.training) else 0.0
            if p <= 0.0:
                h = layer(h, ctx)
            else:
                u = drop_draws[:, i].to(h.device) if drop_draws is not None else \
                    torch.rand(h.shape[0], device=h.device)
                keep = (u >= p).nonzero().squeeze(1)
                if keep.numel() == h.shape[0]:
                    h = layer(h, ctx)
                elif keep.numel() > 0:
                    h = h.index_copy(0, keep, layer(h.index_select(0, keep), ctx))
            if i + 1 in wanted:                # block i's output is exit i + 1
                states.append(h)
        if self.exit_modules is not None:     # exits with a module read its output
            states = torch.stack([self.exit_state(h, e) for e, h in zip(exits, states)])
        else:
            states = self.norm(torch.stack(states))                 # (n_exits, B, T, d)
        # One head call over all exits: (n_exits, B, T, d) -> (n_exits, B, T, V).
        return self.lm_head(states) if head else states

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed_tokens.weight.numel()
        return n
