"""A static KV cache indexed by absolute position (the gpt-fast design).

Every layer owns preallocated key/value buffers of shape (B, n_kv_heads, S, head_dim).
New entries are written at their absolute positions and attention reads the whole
buffer under a causal mask by position, so every shape is static as the sequence grows
(what ``torch.compile`` needs to trace a step once). Because nothing is ever appended or
cropped, a speculative rollback costs nothing (entries past the accepted prefix are
masked out and later overwritten) and a decoder can fill the entries of layers that a
token skipped at any time. Rows of a batch may sit at positions of their own (batched
SSD, ragged prompts): positions are then (B, T) and each row writes and masks its own.
"""

from __future__ import annotations

from typing import Iterable

import torch

from ..config import ModelConfig, UserError


class CacheError(UserError, ValueError):
    """A position or shape does not fit the cache."""


class KVCache:
    def __init__(self, cfg: ModelConfig, batch_size: int = 1, max_seq_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 extra_layers: int = 0):
        """``extra_layers``: slots after the L blocks' for exit modules that attend."""
        max_seq_len = max_seq_len or cfg.max_position_embeddings
        if max_seq_len > cfg.max_position_embeddings:
            raise CacheError(f"cache size {max_seq_len} exceeds the model's context "
                             f"max_position_embeddings={cfg.max_position_embeddings}")
        if batch_size < 1:
            raise CacheError(f"cache batch_size={batch_size}: must be >= 1")
        shape = (batch_size, cfg.num_key_value_heads, max_seq_len, cfg.head_dim)
        n = cfg.num_hidden_layers + extra_layers
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)]
        self.positions = torch.arange(max_seq_len, device=device)      # (S,) for masks
        if self.positions.device.type == "cuda":
            # Compiled steps replay as CUDA graphs there (decode/steps.py), which skip a
            # graph whose inputs are mutated unless their addresses are fixed: a cache's
            # buffers are, for its life (a new cache re-records the graph, not recompiles).
            for buf in (*self.k, *self.v):
                torch._dynamo.mark_static_address(buf)
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len

    def check(self, end: int, batch_size: int) -> None:
        """Refuse writes at positions >= the cache size (``end`` = last position + 1)."""
        if end > self.max_seq_len:
            raise CacheError(f"position {end - 1} is beyond the cache size {self.max_seq_len} "
                             f"(allowed positions: 0..{self.max_seq_len - 1})")
        if batch_size != self.batch_size:
            raise CacheError(f"batch of {batch_size} rows given to a cache built for "
                             f"{self.batch_size}")

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv, T, hd) at positions input_pos: (T,), shared by every row, or
        (B, T), each row at its own (batched SSD, ragged prompts); return the full buffers."""
        k_buf, v_buf = self.k[layer], self.v[layer]
        if input_pos.dim() == 1:
            k_buf.index_copy_(2, input_pos, k)
            v_buf.index_copy_(2, input_pos, v)
        else:
            # Row b's T entries at its own positions: (B, T) -> (B, n_kv, T, hd) indices.
            index = input_pos[:, None, :, None].expand_as(k)
            k_buf.scatter_(2, index, k)
            v_buf.scatter_(2, index, v)
        return k_buf, v_buf

    def copy_up(self, src: int, dst: Iterable[int], pos: int) -> None:
        """Copy layer ``src``'s entries at ``pos`` into layers ``dst`` (the known-bad baseline
        of dynamic early exit: deeper layers then attend to a shallow layer's keys)."""
        for layer in dst:
            self.k[layer][:, :, pos] = self.k[src][:, :, pos]
            self.v[layer][:, :, pos] = self.v[src][:, :, pos]
