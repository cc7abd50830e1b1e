"""The steps every decoding loop is made of: input checks, the cache, prefill, and a
token's pass through a range of blocks. Loops call these, never model internals."""

from __future__ import annotations

import time
import warnings
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch._dynamo.utils import counters

from ..config import SamplingConfig, UserError
from ..model import cpu_matvec
from ..model.exits import ExitHead
from ..model.kernels import linear
from ..model.kv_cache import KVCache
from ..model.transformer import Transformer
from .sampling import choose
from .stats import DecodeStats

# A stop token, or several (Llama 3 instruct models end a turn with any of a set).
StopIds = Union[int, Iterable[int], None]


def stop_set(eos_id: StopIds) -> frozenset[int]:
    if eos_id is None:
        return frozenset()
    return frozenset([eos_id]) if isinstance(eos_id, int) else frozenset(eos_id)


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


def budget(model: Transformer, prompt: torch.Tensor, max_new_tokens: int) -> int:
    """New tokens a generation may produce: checked, and capped by the context."""
    check_prompt(model, prompt)
    check_max_new_tokens(max_new_tokens)
    return min(max_new_tokens, model.config.max_position_embeddings - prompt.shape[1])


def cache_size(model: Transformer, needed: int) -> int:
    """Slots of the cache a generation of ``needed`` positions (prompt + new tokens) decodes
    with: rounded up to a power of two (at least 256, at most the context), so that
    generations of similar lengths share shapes, and so the compiled steps, at the price of
    attending over masked slots."""
    return min(model.config.max_position_embeddings, max(256, 1 << (needed - 1).bit_length()))


def ragged_batch(prompts: Sequence[Sequence[int]], device=None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of any lengths (token lists or 1-D tensors) as one batch: the rows
    right-padded with token 0 to the longest, (B, T_max), and their lengths (B,). Row r's
    prompt sits at positions 0..T_r-1; what the padding writes into the cache lies past
    the row's own positions, masked, and its first new tokens overwrite it."""
    rows = [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in prompts]
    if not rows:
        raise UserError("no prompt to decode")
    for r, row in enumerate(rows):
        if row.numel() == 0 and len(rows) > 1:      # (one empty prompt: check_prompt says so)
            raise UserError(f"prompt {r + 1} of the batch is empty: give at least one token")
    lengths = torch.tensor([row.numel() for row in rows])
    batch = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
    for r, row in enumerate(rows):
        batch[r, :row.numel()] = row
    return batch.to(device), lengths.to(device)


def row_budgets(model: Transformer, lengths: torch.Tensor, max_new_tokens: int) -> list[int]:
    """``budget`` of each row of a ragged batch (prompt lengths (B,)): checked, and each
    capped by the context."""
    check_max_new_tokens(max_new_tokens)
    ctx = model.config.max_position_embeddings
    out = []
    for r, n in enumerate(lengths.tolist()):
        if n >= ctx:
            raise UserError(f"prompt {r + 1} of the batch has {n} tokens, longer than the "
                            f"context allows ({ctx - 1} tokens + 1 generated)")
        out.append(min(max_new_tokens, ctx - n))
    return out


def row_positions(start: torch.Tensor, T: int, last: torch.Tensor) -> torch.Tensor:
    """(B, T) positions start_b..start_b+T-1 of each row, none past ``last`` (B,).

    A batch step runs every row at the same width, so a row that needs fewer positions
    (a smaller budget, a finished row) would run past its last one, and past the cache
    at the context's end: its surplus queries are held at ``last``, the row's final
    position, which none of its kept tokens reads (a kept query sits before it)."""
    return torch.minimum(start[:, None] + torch.arange(T, device=start.device), last[:, None])


def new_cache(model: Transformer, prompt: torch.Tensor, steps: int) -> KVCache:
    """A cache for the prompt and ``steps`` new tokens (``cache_size`` slots)."""
    size = cache_size(model, prompt.shape[1] + steps)
    return model.new_cache(prompt.shape[0], size, prompt.device)


def one_prompt(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, mode: str) -> int:
    """``budget`` for the decoders of one prompt at a time (dee, and ssd.py: batches go to
    ssd_batch.py)."""
    n_new = budget(model, prompt, max_new_tokens)
    if prompt.shape[0] != 1:
        raise UserError(f"mode={mode} decodes one prompt at a time (got a batch of "
                        f"{prompt.shape[0]})")
    return n_new


def first_token(model: Transformer, prompt: torch.Tensor, cache: KVCache, stats: DecodeStats,
                sampling: SamplingConfig, generator: Optional[torch.Generator],
                exit_kv: Optional[tuple[int, ...]] = None) -> int:
    """Prefill the prompt (1, T) through all L blocks and choose the first new token,
    counted as one full pass: the modes that exit early start from the full model
    (``exit_kv``: see ``Transformer.run_layers``)."""
    logits = prefill(model, prompt, cache, model.num_layers, stats, exit_kv)
    stats.add_layers(model.num_layers)
    stats.add_head()
    return int(choose(logits, sampling, generator))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill(model: Transformer, prompt: torch.Tensor, cache: KVCache, end_layer: int,
            stats: DecodeStats, exit_kv: Optional[tuple[int, ...]] = None,
            lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run blocks [0, end_layer) over the prompt; returns the exit logits (B, V) of its last
    token, or with ``lengths`` (B,) (rows right-padded, see ``ragged_batch``) of each row's
    own last token (``exit_kv``: see ``Transformer.run_layers``)."""
    t0 = time.perf_counter()
    h = model.run_layers(model.embed(prompt), 0, end_layer, cache, 0, exit_kv)
    # Only the last position reaches the head; an attending module needs the whole prompt.
    module = model.exit_module(end_layer)
    attends = module is not None and module.has_attention
    if lengths is None:
        if not attends:
            h = h[:, -1:]
        logits = model.lm_head(model.exit_state(h, end_layer, cache, prompt.shape[1] - h.shape[1]))[:, -1]
    else:
        rows = torch.arange(prompt.shape[0], device=prompt.device)
        if attends:
            h = model.exit_state(h, end_layer, cache, 0)
        h = h[rows, lengths - 1][:, None]                             # (B, 1, d)
        logits = model.lm_head(h if attends else model.exit_state(h, end_layer))[:, -1]
    sync(prompt.device)
    stats.prompt_tokens = prompt.numel() if lengths is None else int(lengths.sum())
    stats.prefill_s = time.perf_counter() - t0
    return logits


class Steps:
    """The per-token model calls of the decoding loops, eager or compiled.

    ``token`` runs tokens (B, T) through blocks [0, end) and a head, ``blocks`` the same
    without the head (SSD's last draft, whose proposal is not needed); ``states`` runs
    hidden states (B, T, d) after ``start`` blocks through blocks [start, end) and a head
    (SSD's verify). Positions are tensors and the cache hands attention its full buffers, so with ``compile=True``
    each step is traced once per shape (``fullgraph``: no graph break) and never again as
    the sequence grows. Prefill and the per-layer steps of DEE stay eager.
    """

    def __init__(self, model: Transformer, compile: bool = False):
        self.model = model
        self.compiled = compile
        cpu_matvec.enable_for(model)     # bf16 / int8 weights on the CPU: see model/cpu_matvec.py
        # Seconds of the calls that compiled a graph before running it: a loop takes what
        # accrued during its generation out of its decoding time (DecodeStats.compile_s).
        self.compile_s = 0.0
        self._token_fn = self._wrap(self._token) if compile else self._token
        self._blocks_fn = self._wrap(self._blocks) if compile else self._blocks
        self._states_fn = self._wrap(self._states) if compile else self._states

    def _wrap(self, fn: Callable) -> Callable:
        # One graph per (kind, blocks, width, captured exits): SSD's verify alone has
        # max_drafts + 1 widths, lookup rounds as many more for the drafts' blocks, and del
        # multiplies them by its exits. Past the limit dynamo would run the step eagerly
        # with a warning, and a benchmark's compiled rows would time eager calls.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        compiled = torch.compile(fn, fullgraph=True, dynamic=False,
                                 **compile_options(self.model.lm_head.weight.device))
        state = {"fn": compiled}

        def call(*args):
            graphs, t0 = counters["stats"]["unique_graphs"], time.perf_counter()
            try:
                out = state["fn"](*args)
            except Exception as e:    # no C++ compiler, unsupported backend, ...
                if state["fn"] is fn:
                    raise
                warnings.warn(f"torch.compile is unavailable here ({type(e).__name__}): "
                              "decoding eagerly", stacklevel=2)
                state["fn"] = fn
                self.compiled = False             # what the statistics report
                return fn(*args)
            if counters["stats"]["unique_graphs"] != graphs:
                self.compile_s += time.perf_counter() - t0
            return out
        return call

    # The head's weight (and int8 scale) go in as tensors, not the ExitHead: a compiled graph
    # then takes them as inputs instead of guarding on a Python object that every generation rebuilds.
    # ``capture`` (a tuple of exits, static: one graph per tuple) also returns the states
    # at those exits (see ``Transformer.run_capturing``): SSD's chooser reads them.
    def token(self, tok: torch.Tensor, end: int, cache: KVCache, input_pos: torch.Tensor,
              head: ExitHead, exit_kv: Optional[tuple[int, ...]] = None,
              capture: tuple[int, ...] = ()
              ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """Tokens (B, T) through blocks [0, end) -> states (B, T, d), logits (B, T, N), the
        captured states (``exit_kv``: see ``Transformer.run_layers``)."""
        return self._token_fn(tok, end, cache, input_pos, head.weight, head.scale, exit_kv,
                              capture)

    def blocks(self, tok: torch.Tensor, end: int, cache: KVCache, input_pos: torch.Tensor,
               exit_kv: Optional[tuple[int, ...]] = None, capture: tuple[int, ...] = ()
               ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Tokens (B, T) through blocks [0, end) -> states (B, T, d), no head, and the
        captured states (``exit_kv``: see ``Transformer.run_layers``)."""
        return self._blocks_fn(tok, end, cache, input_pos, exit_kv, capture)

    def states(self, h: torch.Tensor, start: int, end: int, cache: KVCache,
               input_pos: torch.Tensor, head: ExitHead, exit_kv: Optional[tuple[int, ...]] = None,
               capture: tuple[int, ...] = ()
               ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """States (B, T, d) after ``start`` blocks through blocks [start, end) and a head,
        and the captured states (``exit_kv``: see ``Transformer.run_layers``)."""
        return self._states_fn(h, start, end, cache, input_pos, head.weight, head.scale,
                               exit_kv, capture)

    def _token(self, tok, end, cache, input_pos, weight, scale, exit_kv, capture):
        h, captured = self._blocks(tok, end, cache, input_pos, exit_kv, capture)
        # = ExitHead.logits
        return (h, linear(self.model.exit_state(h, end, cache, input_pos), weight, scale=scale),
                captured)

    def _blocks(self, tok, end, cache, input_pos, exit_kv, capture):
        return self.model.run_capturing(self.model.embed(tok), 0, end, capture, cache,
                                        input_pos, exit_kv)

    def _states(self, h, start, end, cache, input_pos, weight, scale, exit_kv, capture):
        h, captured = self.model.run_capturing(h, start, end, capture, cache, input_pos, exit_kv)
        return (h, linear(self.model.exit_state(h, end, cache, input_pos), weight, scale=scale),
                captured)


def compile_options(device: torch.device) -> dict:
    """How a decoding step compiles on ``device``. On the CPU the graph's wrapper (the code
    that calls its kernels) is compiled C++ too: a Python wrapper costs a few microseconds
    per kernel, as much as the kernels of a one-token step at d128. On a GPU the step is
    replayed as a CUDA graph ("reduce-overhead"): one launch instead of hundreds, each of
    which costs about as much as a small model's kernel. A graph's outputs live until the
    next compiled call, so every loop consumes or copies them before it (tested with steps
    that overwrite them, tests/decode/test_ssd_batch.py); the cache's buffers are mutated
    in place, so they are marked static (KVCache), or the graph would be skipped."""
    if device.type == "cpu":
        return {"options": {"cpp_wrapper": True}}
    if device.type == "cuda":
        return {"mode": "reduce-overhead"}
    return {}


def positions(pos: int, T: int, device) -> torch.Tensor:
    """(T,) absolute positions pos..pos+T-1: what compiled steps take instead of an int."""
    return torch.arange(pos, pos + T, device=device)


def truncate_at_eos(tokens: list[int], eos_id: StopIds) -> tuple[list[int], bool]:
    """Tokens up to and including the first stop token, and whether one was found."""
    stops = stop_set(eos_id)
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[: i + 1], True
    return tokens, False
