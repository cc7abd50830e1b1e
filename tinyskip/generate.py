"""Sampling, prefill, and full / static-exit decoding with the static KV cache.

``mode=full`` is static exit at the last layer: both run blocks [0, exit_layer) for
every token, so the deeper layers' cache is never touched by a static exit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from .cache import KVCache
from .config import ConfigError, UserError
from .model import Transformer


@dataclass
class SamplingConfig:
    """temperature 0 = greedy; top_k 0 and top_p 1 = off. The same processing is applied
    to the draft and the full model in speculative sampling."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k}: must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p}: must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def logits_to_probs(logits: torch.Tensor, s: SamplingConfig) -> torch.Tensor:
    """(..., V) logits -> probabilities after temperature, top-k and top-p."""
    logits = logits.float() / s.temperature
    if s.top_k and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # Drop a token when the mass before it already reaches top_p (the top-1 always stays).
        drop = (sorted_p.cumsum(-1) - sorted_p) >= s.top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def choose(logits: torch.Tensor, s: SamplingConfig,
           generator: Optional[torch.Generator]) -> torch.Tensor:
    """(B, V) logits -> (B,) next tokens: argmax when greedy, else a sample."""
    if s.greedy:
        return logits.argmax(-1)
    return torch.multinomial(logits_to_probs(logits, s), 1, generator=generator).squeeze(-1)


@dataclass
class DecodeStats:
    """Counters of one generation. ``calls`` counts block calls and head calls by how many
    tokens each processed ("layer:3" = a block run on 3 positions at once; a head call
    over a small draft vocabulary counts as its fraction of a full-vocabulary call), so
    a benchmark can predict the cost from unit costs measured per width."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    calls: dict[str, float] = field(default_factory=dict)
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    accept_hist: list[int] = field(default_factory=list)   # rounds by accepted drafts

    def add_layers(self, blocks: int, width: int = 1) -> None:
        key = f"layer:{width}"
        self.calls[key] = self.calls.get(key, 0) + blocks

    def add_head(self, width: int = 1, cost: float = 1.0) -> None:
        key = f"head:{width}"
        self.calls[key] = self.calls.get(key, 0) + cost

    def _evals(self, kind: str) -> float:
        """Token-level evaluations: a call on w positions counts w."""
        return sum(int(k.split(":")[1]) * n for k, n in self.calls.items()
                   if k.startswith(kind + ":"))

    @property
    def layer_evals(self) -> float:
        return self._evals("layer")

    @property
    def head_evals(self) -> float:
        return self._evals("head")

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s else 0.0

    def as_dict(self) -> dict:
        n = max(self.new_tokens, 1)
        d = {k: v for k, v in self.__dict__.items()}
        d.update(tokens_per_s=self.tokens_per_s, layers_per_token=self.layer_evals / n,
                 heads_per_token=self.head_evals / n)
        if self.drafted:
            d.update(acceptance=self.accepted / self.drafted,
                     mean_accepted=self.accepted / max(self.rounds, 1))
        return d


@dataclass
class Generation:
    tokens: list[list[int]]          # new tokens of every batch row (up to EOS, inclusive)
    stats: DecodeStats


def check_prompt(model: Transformer, prompt: torch.Tensor) -> None:
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise UserError("the prompt is empty: give at least one token")
    ctx = model.config.max_position_embeddings
    if prompt.shape[1] >= ctx:
        raise UserError(f"the prompt has {prompt.shape[1]} tokens, longer than the context "
                        f"allows ({ctx - 1} tokens + 1 generated)")


def check_max_new_tokens(n: int) -> None:
    if n < 1:
        raise UserError(f"max_new_tokens={n}: must be >= 1")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill(model: Transformer, prompt: torch.Tensor, cache: KVCache, end_layer: int,
            stats: DecodeStats) -> torch.Tensor:
    """Run blocks [0, end_layer) over the prompt; returns the exit logits (B, V) of its last token."""
    t0 = time.perf_counter()
    T = prompt.shape[1]
    h = model.run_layers(model.embed(prompt), 0, end_layer, cache, 0)
    logits = model.head(h[:, -1])
    sync(prompt.device)
    stats.prompt_tokens = T
    stats.prefill_s = time.perf_counter() - t0
    return logits


def truncate_at_eos(tokens: list[int], eos_id: Optional[int]) -> tuple[list[int], bool]:
    if eos_id is not None and eos_id in tokens:
        return tokens[: tokens.index(eos_id) + 1], True
    return tokens, False


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int,
             exit_layer: Optional[int] = None, sampling: SamplingConfig = SamplingConfig(),
             eos_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
             ) -> Generation:
    """Full (exit_layer = L, the default) or static-exit decoding of prompt (B, T).

    Rows of a batch share positions, so their prompts must have equal lengths. Stops
    when every row has produced EOS, after ``max_new_tokens``, or at the context's end.
    """
    L = model.num_layers
    E = L if exit_layer is None else exit_layer
    if not 1 <= E <= L:
        raise UserError(f"exit_layer={E}: must be in 1..{L} (the number of blocks to run)")
    check_prompt(model, prompt)
    check_max_new_tokens(max_new_tokens)
    B, T = prompt.shape
    ctx_len = model.config.max_position_embeddings
    steps = min(max_new_tokens, ctx_len - T)
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config, B, T + steps, prompt.device, dtype)
    stats = DecodeStats()
    logits = prefill(model, prompt, cache, E, stats)
    out = torch.empty(B, steps, dtype=torch.long, device=prompt.device)
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    t0 = time.perf_counter()
    n = 0
    for n in range(1, steps + 1):
        tok = choose(logits, sampling, generator)                       # (B,)
        out[:, n - 1] = tok
        stats.add_layers(E)             # the token's own pass (the first one's is in prefill)
        stats.add_head()
        if eos_id is not None:
            done |= tok == eos_id
            if bool(done.all()):
                break
        if n == steps:
            break
        h = model.run_layers(model.embed(tok[:, None]), 0, E, cache, T + n - 1)
        logits = model.head(h[:, -1])
    sync(prompt.device)
    stats.decode_s = time.perf_counter() - t0
    rows = [truncate_at_eos(r, eos_id)[0] for r in out[:, :n].tolist()]
    stats.new_tokens = sum(len(r) for r in rows)
    if B > 1:     # every row ran every step: a batched call counts once per row
        stats.calls = {k: v * B for k, v in stats.calls.items()}
    return Generation(rows, stats)
