"""Self-speculative decoding of several prompts together: batch > 1, ragged positions.

A round is ssd.py's for every row at once: all rows draft together, one batched step per
draft through blocks [0, E) and the draft head, and verify together, blocks [E, L) over
(B, m+1) states. Row r then accepts its own a_r drafts and advances by a_r + 1, so rows
sit at positions of their own: every step passes (B, T) positions, and the cache writes,
RoPE rows and masks follow each row's (``Transformer.context``). Prompts may differ in
length (right-padded, ``ragged_batch``): row r's prompt fills positions 0..T_r-1 and its
first new token comes from its own last prompt position.

Each row's output is the one it gets decoded alone: greedy, token for token (the same
argument as ssd.py's, row by row); sampled, the full model's distribution, the
speculative rule applied row by row.

Choices, and why:
- Finished rows (a stop token, their budget) stay in the batch until every row has
  finished, their queries held at their last position and their results ignored.
  Dropping them would change the steps' shapes, and every new shape compiles graphs.
- A round drafts as many tokens as the row that can use the most; a row accepts at most
  its own number (never past its budget), and with adaptive drafting stops at its own
  first unconfident draft (the round stops drafting when every row has).
- Prompt-lookup drafts (``ngram``) are refused: a found draft replaces the exit draft
  of its row only, which saves nothing while other rows still draft step by step.
- Choosing the exit per round (``choose=del``) is refused: each row's context would ask
  for its own exit, and rows drafting from different exits cannot share a step.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from ..config import SSDConfig, UserError
from ..model.exits import ExitHead
from ..model.transformer import Transformer
from .sampling import SamplingConfig, accept_sampled, choose, logits_to_probs
from .stats import DecodeStats, Generation
from .steps import (Steps, StopIds, new_cache, prefill, row_budgets, row_positions, sync,
                    truncate_at_eos)


@torch.no_grad()
def ssd_generate_batch(model: Transformer, prompt: torch.Tensor, max_new_tokens: int,
                       cfg: SSDConfig, sampling: SamplingConfig = SamplingConfig(),
                       eos_id: StopIds = None, generator: Optional[torch.Generator] = None,
                       draft_ids: Optional[torch.Tensor] = None, steps: Optional[Steps] = None,
                       lengths: Optional[torch.Tensor] = None) -> Generation:
    """Self-speculative decoding of prompts (B, T), right-padded to T where ``lengths``
    (B,) gives each row's own length (None: all T)."""
    L, E = model.num_layers, cfg.draft_layer
    cfg.validate(L)
    if cfg.ngram:
        raise UserError(f"ngram={cfg.ngram}: prompt-lookup drafts decode one prompt at a time "
                        f"(got a batch of {prompt.shape[0]}); give batch_size=1 or ngram=0")
    if cfg.choose == "del":
        raise UserError(f"choose=del chooses the draft exit per prompt: it decodes one prompt "
                        f"at a time (got a batch of {prompt.shape[0]}); give batch_size=1 or "
                        "choose=fixed")
    B, T = prompt.shape
    dev = prompt.device
    if lengths is None:
        lengths = torch.full((B,), T, device=dev)
    budgets = row_budgets(model, lengths, max_new_tokens)
    step = steps or Steps(model)
    cache = new_cache(model, prompt, max(budgets))
    draft, verifier = ExitHead(model, draft_ids), ExitHead(model)
    stats = DecodeStats()
    module_kv = (E,)                # as in ssd.py: only the draft exit's module is read
    through_module = model.exit_module(E) is not None
    logits = prefill(model, prompt, cache, L, stats, module_kv, lengths)
    stats.add_layers(L)
    stats.add_head()
    cur = choose(logits, sampling, generator)          # (B,) each row's last committed token
    outs = [[t] for t in cur.tolist()]
    ended = [truncate_at_eos(o, eos_id)[1] or len(o) >= b for o, b in zip(outs, budgets)]
    t0, compiling = time.perf_counter(), step.compile_s
    # (B,) the position of each row's last committed token, and the last one it may hold
    pos = lengths.clone()
    last = lengths + torch.tensor(budgets, device=dev) - 1
    while not all(ended):
        # Drafts each row can use: none for a finished row, none past its budget.
        room = [0 if e else min(cfg.k, b - len(o) - 1) for o, b, e in zip(outs, budgets, ended)]
        states, drafts, q = [], [], []     # exit states (B, d) by position, drafts (B,), q (B, V)
        for j in range(max(room)):
            h, dls, _ = step.token(cur[:, None], E, cache, row_positions(pos + j, 1, last), draft,
                                   ())
            # A copy: on a GPU the next compiled call replays its graph, which overwrites
            # this call's outputs (CUDA graphs, steps.compile_options).
            states.append(h[:, 0].clone())
            dl = dls[:, 0]                                                    # (B, N)
            stats.add_layers(E)
            stats.add_head(cost=draft.cost, module=through_module)
            if sampling.greedy:
                idx = dl.argmax(-1)
                probs = torch.softmax(dl.float(), -1) if cfg.adaptive_threshold else None
            else:
                probs = logits_to_probs(dl, sampling)
                idx = torch.multinomial(probs, 1, generator=generator)[:, 0]
            if cfg.adaptive_threshold:
                # A row's first unconfident draft ends its drafts; it is dropped, not verified.
                unsure = (probs.max(-1).values < cfg.adaptive_threshold).tolist()
                room = [j if u and r > j else r for u, r in zip(unsure, room)]
                if max(room) <= j:
                    break
            if not sampling.greedy:
                q.append(draft.full_probs(probs))
            cur = draft.to_vocab(idx)
            drafts.append(cur)
        m = len(drafts)
        if len(states) < m + 1:     # the last draft (or the committed token) has no exit state
            states.append(step.blocks(cur[:, None], E, cache, row_positions(pos + m, 1, last),
                                      module_kv)[0][:, 0])
            stats.add_layers(E)
        verify = step.states(torch.stack(states, 1), E, L, cache, row_positions(pos, m + 1, last),
                             verifier, ())[1]                                 # (B, m+1, V)
        stats.add_layers(L - E, width=m + 1)
        stats.add_head(width=m + 1)
        drafted = torch.stack(drafts, 1) if m else cur.new_zeros(B, 0)        # (B, m)
        accepted, nexts = accept(drafted, verify, room, q, sampling, generator)
        step_by = []
        for r, (a, nxt) in enumerate(zip(accepted, nexts)):
            if ended[r]:
                step_by.append(0)
                continue
            new, stopped = truncate_at_eos(drafted[r, :a].tolist() + [nxt], eos_id)
            outs[r] += new
            ended[r] = stopped or len(outs[r]) >= budgets[r]
            step_by.append(a + 1)
            stats.rounds += 1                 # counted per row: a row's round
            stats.drafted += room[r]
            stats.accepted += a
            stats.accept_hist += [0] * (a + 1 - len(stats.accept_hist))
            stats.accept_hist[a] += 1
        pos = pos + torch.tensor(step_by, device=dev)
        cur = torch.tensor(nexts, device=dev)
    sync(dev)
    stats.compile_s = step.compile_s - compiling
    stats.decode_s = time.perf_counter() - t0 - stats.compile_s
    stats.new_tokens = sum(len(o) for o in outs)
    # Every row ran every batched call: a call counts once per row (as in full.py).
    stats.calls = {key: n * B for key, n in stats.calls.items()}
    return Generation(outs, stats)


def accept(drafted: torch.Tensor, verify: torch.Tensor, room: list[int], q: list[torch.Tensor],
           sampling: SamplingConfig, generator: Optional[torch.Generator]
           ) -> tuple[list[int], list[int]]:
    """Each row's accepted drafts a_r (at most room[r]) and the full model's next token, from
    drafts (B, m), verify logits (B, m+1, V) and, when sampling, the drafts' q[j] (B, V)."""
    B, m = drafted.shape
    if sampling.greedy:
        target = verify.argmax(-1)                                            # (B, m+1)
        # Longest prefix where the draft is the full model's argmax, within the row's room.
        allowed = torch.arange(m, device=drafted.device) < torch.tensor(room, device=drafted.device)[:, None]
        agree = (drafted == target[:, :m]) & allowed                           # (B, m)
        a = agree.long().cumprod(1).sum(1)                                     # (B,)
        return a.tolist(), target.gather(1, a[:, None])[:, 0].tolist()
    p = logits_to_probs(verify, sampling)                                      # (B, m+1, V)
    accepted, nexts = [], []
    for r in range(B):
        n = room[r]
        a, nxt = accept_sampled(drafted[r, :n].tolist(), [qj[r] for qj in q[:n]], p[r, :n + 1],
                                generator)
        accepted.append(a)
        nexts.append(nxt)
    return accepted, nexts
