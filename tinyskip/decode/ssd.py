"""Self-speculative decoding: draft with blocks [0, E) + the shared head, verify with the rest.

One round, with the last committed token t at position p (not yet run by any block):

    draft   for j in 0..m-1: blocks [0, E) on the token at p+j (t, then each draft),
            keep its exit hidden state h[j], and the head proposes draft d_{j+1}
    verify  blocks [0, E) on the last draft d_m alone (position p+m), then blocks
            [E, L) over the m+1 positions p..p+m starting from the kept exit states
            h[0..m], and the head on all of them: the full model's next-token logits

With ``ngram`` = n, a round whose last n tokens occurred earlier in the context drafts
up to ``ngram_k`` (default k) tokens that followed them there instead (decode/lookup.py):
blocks [0, E) then run once over t and those drafts together, and the verify is the same.

Nothing is computed twice: every block runs once per position. The KV cache is indexed
by absolute position, so entries of rejected drafts need no cropping: they lie past the
next round's queries (masked) and are overwritten. Greedy acceptance keeps the longest
prefix of drafts equal to the full model's argmax plus the full model's own next token,
so the output equals greedy full decoding token for token. Sampling uses the
speculative-sampling rule, so the output distribution equals the full model's.

With ``choose="del"`` each round first picks its exit E among candidate exits and its
number of drafts (0..k; 0 = a full step) from the exits' running agreement with the full
model (chooser.py). After the verify, the full model's tokens at the committed positions
p..p+a (a = accepted drafts) are known, and so is every candidate's state there: blocks
[0, E) of the drafts captured the exits below E, blocks [E, L) of the verify those above.
The probe turns those states into what drafting from each exit would have proposed (its
module, then the draft head, one head call for all exits) and the chooser counts the
agreements; E's own samples are its drafts. Changing E between rounds leaves every
block's cache complete: each committed position ran blocks [0, E) in its draft and
[E, L) in its verify, for whatever E its round had, and rejected positions are masked and
overwritten as always. Attending exit modules keep caches of their own, which a position
fills only where some call ran the module (or ``exit_kv`` named it): the prefill names
every candidate, E's drafts (and the last draft's blocks call) fill E's, and the probe's
module calls at p..p+a fill every other candidate's, so each candidate's module attends
over every committed position whichever exit drafted it. With ``ngram``, a round whose
context repeats drafts the found tokens whatever del chose; no exit drafted there, so
every candidate, E included, learns from the probe.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from ..config import SSDConfig
from ..model.exits import ExitHead
from ..model.kernels import linear
from ..model.kv_cache import KVCache
from ..model.transformer import Transformer
from .chooser import DraftChooser, round_costs
from .confidence import max_prob
from .lookup import lookup
from .sampling import SamplingConfig, accept_sampled, logits_to_probs
from .ssd_batch import ssd_generate_batch
from .stats import DecodeStats, Generation
from .steps import (Steps, StopIds, first_token, new_cache, one_prompt, positions, sync,
                    truncate_at_eos)


@torch.no_grad()
def ssd_generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, cfg: SSDConfig,
                 sampling: SamplingConfig = SamplingConfig(), eos_id: StopIds = None,
                 generator: Optional[torch.Generator] = None,
                 draft_ids: Optional[torch.Tensor] = None,
                 steps: Optional[Steps] = None,
                 lengths: Optional[torch.Tensor] = None) -> Generation:
    """Self-speculative decoding of one prompt (1, T); prompts (B, T), right-padded where
    ``lengths`` (B,) gives their own lengths, decode together in ssd_batch.py."""
    if prompt.dim() == 2 and prompt.shape[0] > 1:
        return ssd_generate_batch(model, prompt, max_new_tokens, cfg, sampling, eos_id,
                                  generator, draft_ids, steps, lengths)
    L = model.num_layers
    cfg.validate(L)
    draft, verifier = ExitHead(model, draft_ids), ExitHead(model)
    exits, chooser = [], None               # del's candidate exits, and its chooser
    if cfg.choose == "del":
        exits = cfg.candidates(L, model.module_exits)
        chooser = DraftChooser(exits, cfg.k, round_costs(model, exits, draft), L)
    E = cfg.first_exit(exits)
    n_new = one_prompt(model, prompt, max_new_tokens, "ssd")
    step = steps or Steps(model)
    T, dev = prompt.shape[1], prompt.device
    cache = new_cache(model, prompt, n_new)
    stats = DecodeStats()
    # Only the draft exits' modules (if they attend) are ever read. Their keys at a
    # position come from a module call there (a draft step, del's probe), or, where a
    # position only ran blocks (the prompt, the last draft), from run_layers: exit_kv
    # names them there alone.
    out = [first_token(model, prompt, cache, stats, sampling, generator, tuple(exits) or (E,))]
    t0, compiling = time.perf_counter(), step.compile_s
    # Exit states of one round: at most max_drafts drafts plus the last committed token
    # (the buffer never exceeds what the budget can use, whatever k or ngram_k asks for).
    width = min(cfg.max_drafts, n_new) + 1
    h_exit = torch.empty(1, width, model.config.hidden_size, device=dev, dtype=cache.k[0].dtype)
    # del: every candidate's states at the round's positions, (n_exits, width, d), copied
    # out of the steps' outputs (a CUDA graph's outputs live until its next call).
    h_seen = h_exit.new_empty(len(exits), width, h_exit.shape[-1])
    row = {e: i for i, e in enumerate(exits)}
    # Prompt and output so far, extended as tokens are committed (lookup reads it).
    context = prompt[0].tolist() + out if cfg.ngram else []
    _, finished = truncate_at_eos(out, eos_id)
    while len(out) < n_new and not finished:
        p = T + len(out) - 1                        # position of the last committed token
        # The first round drafts k from draft_layer; del chooses every later one.
        E, want = chooser.choose() if chooser is not None and stats.rounds else (E, cfg.k)
        k = min(want, n_new - len(out) - 1)         # never draft past what is still needed
        below = tuple(e for e in exits if e < E)    # captured by the drafts' blocks [0, E)
        above = tuple(e for e in exits if e > E)    # captured by the verify's blocks [E, L)
        through_module = model.exit_module(E) is not None
        cur = torch.tensor([out[-1]], device=dev)   # (1,)
        drafts, q, have = [], [], 0                 # have: exit states computed so far
        tops = []                                   # del, sampling: E's argmax at each draft
        # A repeat drafts up to ngram_k found tokens whatever del chose for an exit round.
        found = lookup(context, cfg.ngram, min(cfg.lookup_k, n_new - len(out) - 1)) \
            if cfg.ngram else []
        if found:
            # Blocks [0, E) over t and the found drafts at once: their exit states.
            m = len(found)
            tokens = torch.tensor([[out[-1], *found]], device=dev)                # (1, m+1)
            h, got = step.blocks(tokens, E, cache, positions(p, m + 1, dev), (E,), below)
            h_exit[:, :m + 1] = h
            for e, state in zip(below, got):     # del: what the exits below E saw there
                h_seen[row[e], :m + 1] = state[0]
            stats.add_layers(E, width=m + 1)
            stats.lookup_rounds += 1
            drafts, have = [torch.tensor([t], device=dev) for t in found], m + 1
            if not sampling.greedy:       # a found draft is certain: q puts all mass on it
                q = list(torch.nn.functional.one_hot(torch.tensor(found, device=dev),
                                                     model.config.vocab_size).float())
        for j in range(k if not found else 0):
            h, dls, got = step.token(cur[None], E, cache, positions(p + j, 1, dev), draft, (),
                                     below)
            h_exit[:, j] = h[:, 0]
            for e, state in zip(below, got):
                h_seen[row[e], j] = state[0, 0]
            have = j + 1
            dl = dls[0, 0]                                                # (N,)
            stats.add_layers(E)
            stats.add_head(cost=draft.cost, module=through_module)
            if sampling.greedy:
                idx = dl.argmax()
                conf = max_prob(torch.softmax(dl.float(), -1)) if cfg.adaptive_threshold else 1.0
            else:
                probs = logits_to_probs(dl, sampling)
                idx = torch.multinomial(probs, 1, generator=generator)[0]
                conf = max_prob(probs) if cfg.adaptive_threshold else 1.0
            if conf < cfg.adaptive_threshold:
                break                       # an unconfident draft is dropped, not verified
            if not sampling.greedy:
                q.append(draft.full_probs(probs))
                if chooser is not None:
                    tops.append(draft.to_vocab(dl.argmax()).view(1))
            cur = draft.to_vocab(idx).view(1)
            drafts.append(cur)
        m = len(drafts)
        if have < m + 1:    # the last draft (or t itself when m = 0) has no exit state yet
            # Blocks only: the draft head's proposal after the last draft is not needed.
            h, got = step.blocks(cur[None], E, cache, positions(p + m, 1, dev), (E,), below)
            h_exit[:, m] = h[:, 0]
            for e, state in zip(below, got):
                h_seen[row[e], m] = state[0, 0]
            stats.add_layers(E)
        # (1, m+1, d) with strides of its own shape, not the buffer's: a compiled verify
        # step is then one graph per width, whatever k sized the buffer.
        states = h_exit[0, :m + 1].unsqueeze(0)
        _, verify, got = step.states(states, E, L, cache, positions(p, m + 1, dev), verifier,
                                     (), above)
        verify = verify[0]                                                       # (m+1, V)
        for e, state in zip(above, got):
            h_seen[row[e], :m + 1] = state[0]
        stats.add_layers(L - E, width=m + 1)
        stats.add_head(width=m + 1)
        drafted = torch.cat(drafts).tolist() if drafts else []
        if sampling.greedy:
            target = verify.argmax(-1).tolist()
            a = 0
            while a < m and drafted[a] == target[a]:
                a += 1
            nxt = target[a]
        else:
            a, nxt = accept_sampled(drafted, q, logits_to_probs(verify, sampling), generator)
        if chooser is not None:
            if m == 0 or found:         # no exit drafts: E is probed like the others
                h_seen[row[E], :m + 1] = h_exit[0, :m + 1]
            # Sampled rounds learn the same greedy agreement: the full model's argmax
            # against each exit's (an estimate of acceptance, not the sampled rule's own).
            own = [] if found else drafted if sampling.greedy else \
                torch.cat(tops).tolist() if tops else []
            learn(model, chooser, draft, E, own,
                  target if sampling.greedy else verify.argmax(-1).tolist(), a, h_seen, row,
                  cache, positions(p, a + 1, dev), stats)
            if not found:               # (lookup rounds are counted apart)
                stats.add_choice(E if m else L, m)
        out.extend(drafted[:a] + [nxt])
        if cfg.ngram:
            context.extend(drafted[:a] + [nxt])
        out, finished = truncate_at_eos(out, eos_id)
        stats.rounds += 1
        stats.drafted += m
        stats.accepted += a
        stats.accept_hist += [0] * (a + 1 - len(stats.accept_hist))
        stats.accept_hist[a] += 1
    sync(dev)
    stats.compile_s = step.compile_s - compiling
    stats.decode_s = time.perf_counter() - t0 - stats.compile_s
    stats.new_tokens = len(out)
    return Generation([out], stats)


def learn(model: Transformer, chooser: DraftChooser, head: ExitHead, E: int, own: list[int],
          target: list[int], a: int, h_seen: torch.Tensor, row: dict[int, int], cache: KVCache,
          pos: torch.Tensor, stats: DecodeStats) -> None:
    """Fold a round into the chooser. ``target``: the full model's argmax at p..p+m; ``a``
    drafts accepted, so positions p..p+a (``pos``) were committed. E's samples are its own
    proposals ``own`` up to the first miss (those after it followed a rejected draft); every
    other candidate's, what it proposes from its states ``h_seen`` at p..p+a (its module
    calls and the one head call counted in ``stats``)."""
    chooser.update(E, [own[j] == target[j] for j in range(min(a + 1, len(own)))])
    probed = [e for e in chooser.exits if e != E or not own]
    states = h_seen[[row[e] for e in probed], :a + 1]                       # (n, a+1, d)
    proposals = exit_proposals(model, head, states, probed, cache, pos).tolist()
    stats.add_head(width=states.shape[0] * states.shape[1], cost=head.cost)
    for e in probed:
        if model.exit_module(e) is not None:
            stats.add_module(width=a + 1)
    for e, proposed in zip(probed, proposals):
        chooser.update(e, [x == y for x, y in zip(proposed, target)])


def exit_proposals(model: Transformer, head: ExitHead, states: torch.Tensor, exits: list[int],
                   cache: KVCache, pos: torch.Tensor) -> torch.Tensor:
    """What drafting from each of ``exits`` proposes (greedy) from its states (n, T, d) at
    positions ``pos`` (T,): token ids (n, T). Each exit's module runs there (an attending
    one writes its keys and values on the way), then one head call serves all exits, so
    the head is read once."""
    normed = torch.cat([model.exit_state(states[i:i + 1], e, cache, pos)
                        for i, e in enumerate(exits)])                       # (n, T, d)
    return head.to_vocab(linear(normed, head.weight, scale=head.scale).argmax(-1))
