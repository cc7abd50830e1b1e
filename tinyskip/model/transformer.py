"""A Llama-style decoder with one shared exit head, driven layer by layer.

Parameter names follow Hugging Face's ``LlamaForCausalLM`` minus its ``model.`` prefix
(``embed_tokens``, ``layers.N.self_attn.q_proj``, ..., ``norm``, ``lm_head``), so the
Llama shim is a rename.

Exit E (1..L, blocks run) is the shared head (final ``norm`` + ``lm_head``) applied to
the output of block E (``layers[E - 1]``), or, where exit modules are attached (exit_modules.py), the head
after the exit's module; exit L is the model's normal output. Decoders drive the model
through ``embed``, ``run_layers(h, start, end, cache, pos)`` and ``head`` /
``head_at(h, exit, ...)``; the training ``forward`` takes exits numbered the same way.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, UserError
from .kernels import DECODE_KERNELS, Kernels, Linear
from .kv_cache import KVCache
from .layers import AttnContext, DecoderLayer, RMSNorm, rope_tables


class LayerIndexError(UserError, ValueError):
    """A layer index or range outside the model's blocks."""


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
        growing sequence never changes a traced constant), or (B, T) positions, row b's
        tokens at its own (rows of a batch that accepted different numbers of drafts, or
        started from prompts of different lengths). With a cache, attention reads
        the cache's full preallocated buffers under a mask by position: shapes stay static
        as the sequence grows, and stale entries past the query (rejected drafts) are masked.
        """
        if isinstance(pos, int):
            if cache is not None:
                cache.check(pos + T, batch_size)
            input_pos = torch.arange(pos, pos + T, device=self.rope_cos.device)
        else:
            input_pos = pos
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]       # (..., T, hd)
        if input_pos.dim() == 2:          # per row: (B, T, hd) -> (B, 1, T, hd), over heads
            cos, sin = cos[:, None], sin[:, None]
        ctx = AttnContext(cos, sin, input_pos, cache, kernels=kernels)
        if cache is not None:
            # (T, S), or per row (B, T, S) -> (B, 1, T, S): each query sees its row's
            # entries up to its own position.
            ctx.mask = cache.positions <= input_pos[..., None]
            if input_pos.dim() == 2:
                ctx.mask = ctx.mask[:, None]
        return ctx

    def run_layers(self, h: torch.Tensor, start: int, end: int, cache: Optional[KVCache] = None,
                   pos: Union[int, torch.Tensor] = 0,
                   exit_kv: Optional[tuple[int, ...]] = None,
                   kernels: Kernels = DECODE_KERNELS) -> torch.Tensor:
        """Run blocks [start, end) on h (B, T, d) at absolute positions pos..pos+T-1
        (``pos``: see ``context``; ``kernels``: see ``Kernels``). ``exit_kv``: the exits whose attending modules get
        their keys and values written on the way (None: every one passed). A decoder
        writes only those it reads: DEE every exit, SSD its draft exit (with a chooser,
        every candidate's at the prompt), full none, and static exit none (its own module
        writes them when it runs).

        Without a cache the call is a plain causal pass over positions 0..T-1. With one,
        each token attends to every cached position up to its own, so callers decode at
        consecutive positions.
        """
        return self.run_capturing(h, start, end, (), cache, pos, exit_kv, kernels)[0]

    def run_capturing(self, h: torch.Tensor, start: int, end: int, capture: tuple[int, ...],
                      cache: Optional[KVCache] = None, pos: Union[int, torch.Tensor] = 0,
                      exit_kv: Optional[tuple[int, ...]] = None,
                      kernels: Kernels = DECODE_KERNELS
                      ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """``run_layers``, also returning the states (B, T, d) at the exits ``capture``
        names (in its order; each in (start, end]): SSD's chooser reads every candidate
        exit off the passes a round runs anyway."""
        self.check_range(start, end)
        ctx = self.context(pos, h.shape[1], cache, h.shape[0], kernels)
        states = {}
        for i in range(start, end):       # (slicing a ModuleList builds a new one: slow)
            h = self.layers[i](h, ctx)
            if cache is not None and i + 1 in self._kv_exits and \
                    (exit_kv is None or i + 1 in exit_kv):
                self.exit_modules[i + 1].write_kv(h, ctx)
            if i + 1 in capture:
                states[i + 1] = h
        return h, tuple(states[e] for e in capture)

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

    @property
    def module_exits(self) -> list[int]:
        """The exits (blocks run) with a module attached, sorted; [] without modules."""
        return self.exit_modules.exit_layers if self.exit_modules is not None else []

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
                drop_draws: Optional[torch.Tensor] = None, head: bool = True,
                called: Optional[Sequence[bool]] = None) -> torch.Tensor:
        """Logits (n_exits, B, T, V) at ``exits`` (1..L, blocks run; default: exit L);
        with ``head=False``, what the shared ``lm_head`` would read instead (n_exits, B, T, d):
        the trainer's fused linear + cross-entropy takes those and never holds the logits.

        ``layer_drop`` gives one drop probability per block; in training each row of the
        batch skips block l with that probability (identity for that row, no rescaling),
        and the block runs on the kept rows only, so dropping saves compute. Row b drops
        block l when ``drop_draws[b, l]`` (uniforms (B, L), default fresh ones) < p_l: the
        trainer passes draws of the global batch so data-parallel ranks drop as one process.
        ``called``: the blocks some row of the global batch keeps; this process calls them
        even where its own rows all skip one (on no rows), since a sharded (FSDP) block's
        call gathers its weights with every rank.
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
                elif keep.numel() > 0 or (called is not None and called[i]):
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
