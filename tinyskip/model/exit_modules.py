"""Exit modules (Balcony): a small trainable module between an exit and the shared head.

The bare exit E applies the model's final norm and the shared head to the output of
block E-1. An exit module replaces that final norm with its own computation:

    block      a full decoder block + RMSNorm (Balcony; initialised from the backbone's
               last block and final norm, so at init it computes what block L-1 would
               compute on h_E)
    mlp        the block's MLP half only (pre-norm residual MLP) + RMSNorm
    attention  the block's attention half only (pre-norm residual attention) + RMSNorm
    norm       only an RMSNorm of its own before the head

The head stays the backbone's (tied, frozen): only the modules train. Parameter names
follow the Hugging Face Llama decoder layer (``self_attn.q_proj``, ``mlp.gate_proj``,
``input_layernorm``...) plus ``norm``, stored under ``by_exit.<E>.``.

Modules with attention keep keys and values like any block, in extra slots of the KV
cache (slot L + i for the i-th of them). Their keys and values at a position come from
h_E there. A module's own forward writes them at the positions it runs on; where a
position only ran blocks, ``Transformer.run_layers`` writes them as block E-1 runs, for
the exits its caller reads (``exit_kv``: DEE every exit, SSD its draft exit, full and
static none), and ``propagate_kv`` fills them from an earlier exit state like a deeper
block's. A module a decoder reads then attends over every position, whatever path the
position took.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import EXIT_MODULE_KINDS, ConfigError, ModelConfig
from .layers import MLP, Attention, RMSNorm


def check_exit_layers(exit_layers: list[int], num_layers: int) -> None:
    """Exit modules sit at exits 1..L-1 (exit L is the model's own output), once each."""
    if not exit_layers:
        raise ConfigError("exit_layers=[]: give at least one exit (blocks run, 1..L-1)")
    bad = [e for e in exit_layers if not 1 <= e < num_layers]
    if bad:
        raise ConfigError(f"exit_layers={list(exit_layers)}: {bad[0]} is outside 1..{num_layers - 1} "
                          f"(exit {num_layers} is the model's own output)")
    if len(set(exit_layers)) != len(exit_layers):
        raise ConfigError(f"exit_layers={list(exit_layers)}: an exit is listed twice")


def check_kind(kind: str) -> None:
    if kind not in EXIT_MODULE_KINDS:
        raise ConfigError(f"exit kind={kind!r}: must be one of {', '.join(EXIT_MODULE_KINDS)}")


class ExitModule(nn.Module):
    """One exit's module: (B, T, d) state after E blocks -> (B, T, d) normed state for
    the shared head."""

    def __init__(self, cfg: ModelConfig, kind: str, cache_slot: int):
        super().__init__()
        check_kind(kind)
        self.kind = kind
        self.has_attention = kind in ("block", "attention")
        if self.has_attention:
            self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.self_attn = Attention(cfg, cache_slot)
        if kind in ("block", "mlp"):
            self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.mlp = MLP(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def body(self, h: torch.Tensor, ctx) -> torch.Tensor:
        """The residual computation before the norm (= the last block's, for ``block``)."""
        if self.has_attention:
            h = h + self.self_attn(self.input_layernorm(h), ctx)
        if hasattr(self, "mlp"):
            h = h + self.mlp(self.post_attention_layernorm(h))
        return h

    def forward(self, h: torch.Tensor, ctx) -> torch.Tensor:
        return self.norm(self.body(h, ctx))

    def write_kv(self, h: torch.Tensor, ctx) -> None:
        """Keys and values of states h (B, T, d) at ctx's positions into the cache."""
        k, v = self.self_attn.kv(self.input_layernorm(h), ctx)
        ctx.cache.update(self.self_attn.layer_idx, ctx.input_pos, k, v)


class ExitModules(nn.Module):
    """The modules of one model, by exit (blocks run)."""

    def __init__(self, cfg: ModelConfig, exit_layers: list[int], kind: str = "block"):
        super().__init__()
        check_exit_layers(exit_layers, cfg.num_hidden_layers)
        self.kind = kind
        self.exit_layers = sorted(exit_layers)
        L, slots = cfg.num_hidden_layers, 0
        modules = {}
        for e in self.exit_layers:
            modules[str(e)] = module = ExitModule(cfg, kind, L + slots)
            slots += module.has_attention
        self.by_exit = nn.ModuleDict(modules)
        self.cache_slots = slots           # extra KV-cache layers the modules need

    def __contains__(self, exit: int) -> bool:
        return str(exit) in self.by_exit

    def __getitem__(self, exit: int) -> ExitModule:
        return self.by_exit[str(exit)]

    @torch.no_grad()
    def init_from(self, model) -> "ExitModules":
        """Balcony's initialisation: each module copies the matching parts of the
        backbone's last block, and its norm the backbone's final norm."""
        last = model.layers[-1].state_dict()
        for module in self.by_exit.values():
            own = module.state_dict()
            own.update({k: v for k, v in last.items() if k in own})
            own["norm.weight"] = model.norm.weight.detach().clone()
            module.load_state_dict(own)
        return self
