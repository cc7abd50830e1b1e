"""Self-speculative decoding: draft with blocks [0, E) + the shared head, verify with the rest.

One round, with the last committed token t at position p (not yet run by any block):

    draft   for j in 0..m-1: blocks [0, E) on the token at p+j (t, then each draft),
            keep its exit hidden state h[j], and the head proposes draft d_{j+1}
    verify  blocks [0, E) on the last draft d_m alone (position p+m), then blocks
            [E, L) over the m+1 positions p..p+m starting from the kept exit states
            h[0..m], and the head on all of them: the full model's next-token logits

Nothing is computed twice: every block runs once per position. The KV cache is indexed
by absolute position, so entries of rejected drafts need no cropping: they lie past the
next round's queries (masked) and are overwritten. Greedy acceptance keeps the longest
prefix of drafts equal to the full model's argmax plus the full model's own next token,
so the output equals greedy full decoding token for token. Sampling uses the
speculative-sampling rule, so the output distribution equals the full model's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .cache import KVCache
from .config import UserError
from .generate import (DecodeStats, Generation, SamplingConfig, check_max_new_tokens,
                       check_prompt, choose, logits_to_probs, prefill, sync, truncate_at_eos)
from .model import Transformer


@dataclass
class SSDConfig:
    draft_layer: int                 # E: the draft runs blocks [0, E), 1 <= E <= L
    k: int = 4                       # drafts per round (at most)
    adaptive_threshold: float = 0.0  # stop drafting when the draft's top-1 prob falls below
    draft_vocab: int = 0             # score drafts over the N most frequent tokens (0 = all)

    def validate(self, num_layers: int) -> None:
        if not 1 <= self.draft_layer <= num_layers:
            raise UserError(f"draft_layer={self.draft_layer}: must be in 1..{num_layers} for "
                            f"this {num_layers}-layer model (E = L drafts with the full model)")
        if self.k < 1:
            raise UserError(f"k={self.k}: must be >= 1 (draft tokens per round)")
        if not 0.0 <= self.adaptive_threshold < 1.0:
            raise UserError(f"adaptive_threshold={self.adaptive_threshold}: must be in [0, 1)")
        if self.draft_vocab < 0:
            raise UserError(f"draft_vocab={self.draft_vocab}: must be >= 0 (0 = full vocabulary)")


def frequent_tokens(train_tokens: np.ndarray, vocab_size: int, n: int) -> torch.Tensor:
    """Ids of the n most frequent tokens of the training data (sorted by id)."""
    counts = torch.from_numpy(np.bincount(np.asarray(train_tokens), minlength=vocab_size))
    return torch.topk(counts.float(), min(n, vocab_size)).indices.sort().values


class DraftHead:
    """The shared head, optionally restricted to a subset of the vocabulary.

    Restricting cuts the head's V*d cost at small widths; the full model still verifies
    over the whole vocabulary, so greedy output is unchanged.
    """

    def __init__(self, model: Transformer, ids: Optional[torch.Tensor] = None):
        self.model, self.ids = model, ids
        w = model.lm_head.weight
        self.weight = w if ids is None else w[ids.to(w.device)].contiguous()     # (N, d)
        self.vocab_size = w.shape[0]
        # Cost of one call in full-vocabulary head evaluations (the V*d matmul dominates).
        self.cost = self.weight.shape[0] / self.vocab_size

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., N) logits over the draft vocabulary."""
        return torch.nn.functional.linear(self.model.norm(h), self.weight)

    def to_vocab(self, idx: torch.Tensor) -> torch.Tensor:
        return idx if self.ids is None else self.ids.to(idx.device)[idx]

    def full_probs(self, probs: torch.Tensor) -> torch.Tensor:
        """(N,) draft-vocabulary probabilities -> (V,), zero outside the draft vocabulary."""
        if self.ids is None:
            return probs
        return probs.new_zeros(self.vocab_size).index_copy(0, self.ids.to(probs.device), probs)


def _accept_sampled(drafts: list[int], q: list[torch.Tensor], p: torch.Tensor,
                    generator: Optional[torch.Generator]) -> tuple[int, int]:
    """Speculative sampling: (accepted drafts, the full model's next token)."""
    for j, x in enumerate(drafts):
        u = float(torch.rand((), generator=generator))
        if u * float(q[j][x]) < float(p[j][x]):          # u < min(1, p/q), no division
            continue
        residual = (p[j] - q[j]).clamp_min(0.0)
        if float(residual.sum()) <= 0.0:                  # p == q up to rounding
            residual = p[j]
        return j, int(torch.multinomial(residual, 1, generator=generator))
    return len(drafts), int(torch.multinomial(p[len(drafts)], 1, generator=generator))


@torch.no_grad()
def ssd_generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, cfg: SSDConfig,
                 sampling: SamplingConfig = SamplingConfig(), eos_id: Optional[int] = None,
                 generator: Optional[torch.Generator] = None,
                 draft_ids: Optional[torch.Tensor] = None) -> Generation:
    """Self-speculative decoding of one prompt (1, T)."""
    L, E = model.num_layers, cfg.draft_layer
    cfg.validate(L)
    check_prompt(model, prompt)
    check_max_new_tokens(max_new_tokens)
    if prompt.shape[0] != 1:
        raise UserError(f"mode=ssd decodes one prompt at a time (got a batch of {prompt.shape[0]})")
    T, dev = prompt.shape[1], prompt.device
    steps = min(max_new_tokens, model.config.max_position_embeddings - T)
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config, 1, T + steps, dev, dtype)
    draft = DraftHead(model, draft_ids)
    stats = DecodeStats()
    logits = prefill(model, prompt, cache, L, stats)
    t0 = time.perf_counter()
    out = [int(choose(logits, sampling, generator))]
    stats.add_layers(L)
    stats.add_head()
    h_exit = torch.empty(1, cfg.k + 1, model.config.hidden_size, device=dev, dtype=dtype)
    finished = eos_id is not None and out[-1] == eos_id
    while len(out) < steps and not finished:
        p = T + len(out) - 1                        # position of the last committed token
        k = min(cfg.k, steps - len(out) - 1)        # never draft past what is still needed
        cur = torch.tensor([[out[-1]]], device=dev)
        drafts, q, have = [], [], 0                 # have: exit states computed so far
        for j in range(k):
            h = model.run_layers(model.embed(cur), 0, E, cache, p + j)
            h_exit[:, j] = h[:, 0]
            have = j + 1
            dl = draft.logits(h[0, -1])                                  # (N,)
            stats.add_layers(E)
            stats.add_head(cost=draft.cost)
            if sampling.greedy:
                idx = dl.argmax()
                conf = float(torch.softmax(dl.float(), -1)[idx]) if cfg.adaptive_threshold else 1.0
            else:
                probs = logits_to_probs(dl, sampling)
                idx = torch.multinomial(probs, 1, generator=generator)[0]
                conf = float(probs.max()) if cfg.adaptive_threshold else 1.0
            if conf < cfg.adaptive_threshold:
                break                       # an unconfident draft is dropped, not verified
            if not sampling.greedy:
                q.append(draft.full_probs(probs))
            cur = draft.to_vocab(idx).view(1, 1)
            drafts.append(cur)
        m = len(drafts)
        if have < m + 1:    # the last draft (or t itself when m = 0) has no exit state yet
            h = model.run_layers(model.embed(cur), 0, E, cache, p + m)
            h_exit[:, m] = h[:, 0]
            stats.add_layers(E)
        hv = model.run_layers(h_exit[:, :m + 1], E, L, cache, p)
        verify = model.head(hv[0])                                       # (m+1, V)
        stats.add_layers(L - E, width=m + 1)
        stats.add_head(width=m + 1)
        draft_ids_list = torch.cat(drafts).view(-1).tolist() if drafts else []
        if sampling.greedy:
            target = verify.argmax(-1).tolist()
            a = 0
            while a < m and draft_ids_list[a] == target[a]:
                a += 1
            nxt = target[a]
        else:
            a, nxt = _accept_sampled(draft_ids_list, q, logits_to_probs(verify, sampling), generator)
        out.extend(draft_ids_list[:a] + [nxt])
        out, finished = truncate_at_eos(out, eos_id)
        stats.rounds += 1
        stats.drafted += m
        stats.accepted += a
        stats.accept_hist += [0] * (a + 1 - len(stats.accept_hist))
        stats.accept_hist[a] += 1
    sync(dev)
    stats.decode_s = time.perf_counter() - t0
    stats.new_tokens = len(out)
    return Generation([out], stats)
