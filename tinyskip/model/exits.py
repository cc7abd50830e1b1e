"""Exit heads: what turns a hidden state after E blocks into next-token logits.

Every exit is the model's shared head (``lm_head``) after the final norm or, where the
model has an exit module at that exit, after the module (exit_modules.py), optionally
restricted to a subset of the vocabulary (the small draft vocabulary of SSD). Decoders
call ``ExitHead.logits(h, exit, cache, pos)`` and never reach into ``lm_head.weight``
themselves.

Exits are numbered by blocks run: exit E (1..L) is the head on the output of block E-1,
and exit L is the model's normal output.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

from .kernels import linear
from .kv_cache import KVCache
from .transformer import Transformer


def frequent_tokens(train_tokens: np.ndarray, vocab_size: int, n: int) -> torch.Tensor:
    """Ids of the n most frequent tokens of the training data (sorted by id)."""
    counts = torch.from_numpy(np.bincount(np.asarray(train_tokens), minlength=vocab_size))
    return torch.topk(counts.float(), min(n, vocab_size)).indices.sort().values


class ExitHead:
    """The shared head, over the whole vocabulary or the subset ``vocab_ids``.

    Restricting cuts the head's V*d cost at small widths; callers that need the whole
    vocabulary (verification, the last exit) use an unrestricted head.
    """

    def __init__(self, model: Transformer, vocab_ids: Optional[torch.Tensor] = None):
        self.model = model
        w, scale = model.lm_head.weight, model.lm_head.weight_scale
        self.ids = None if vocab_ids is None else vocab_ids.to(w.device)
        self.weight = w if self.ids is None else w[self.ids].contiguous()      # (N, d)
        # (N,) when the head is int8 (model/quantize.py), else None
        self.scale = scale if scale is None or self.ids is None else scale[self.ids]
        self.vocab_size = w.shape[0]
        # Cost of one call in full-vocabulary head evaluations (the V*d matmul dominates).
        self.cost = self.weight.shape[0] / self.vocab_size

    def logits(self, h: torch.Tensor, exit: int, cache: Optional[KVCache] = None,
               pos: Union[int, torch.Tensor] = 0) -> torch.Tensor:
        """(B, T, d) hidden states after ``exit`` blocks at positions pos.. -> (B, T, N)
        logits (without a cache: a whole sequence from position 0; see
        ``Transformer.exit_state``)."""
        return linear(self.model.exit_state(h, exit, cache, pos), self.weight, scale=self.scale)

    def to_vocab(self, idx: torch.Tensor) -> torch.Tensor:
        """Indices into the head's vocabulary -> token ids."""
        return idx if self.ids is None else self.ids[idx.to(self.ids.device)]

    def full_probs(self, probs: torch.Tensor) -> torch.Tensor:
        """(..., N) probabilities over the head's vocabulary -> (..., V), zero outside it."""
        if self.ids is None:
            return probs
        return probs.new_zeros(*probs.shape[:-1], self.vocab_size).index_copy(-1, self.ids, probs)
