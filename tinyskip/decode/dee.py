"""Dynamic early exit (CALM): each token leaves at the first checked exit whose
confidence reaches that exit's threshold, else runs all L blocks.

A token that leaves after E blocks has no state in blocks [E, L), yet later tokens
attend to it there. ``cache=`` picks how those entries are made:

    propagate   (CALM) each deeper block projects its own keys and values from the exit
                hidden state, as if that state were its input;
    recompute   (deferred, EE-LLM / FREE) the exited positions wait; the next token that
                goes deeper runs each skipped block over them and itself in one call of
                width m + 1, so deeper blocks see the true hidden states;
    copy        the exit block's keys and values copied upward: the known-bad baseline
                (CALM: ROUGE-L 38.2 -> 23.0), kept only for comparison.

Why ``recompute`` needs no bookkeeping beyond a list: a token that runs block l first
brings every earlier position to depth l + 1, so depths never increase along the
sequence and the positions still waiting always form a suffix [s, p) with non-increasing
depths. At block l the waiting positions at depth l are a suffix of that suffix, which
runs together with the current token as one contiguous call.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from ..config import DEEConfig, UserError
from ..model.exit_classifier import ExitClassifier
from ..model.exits import ExitHead
from ..model.kv_cache import KVCache
from ..model.transformer import Transformer
from .confidence import HEAD_FREE, TokenConfidence, decayed_threshold
from .sampling import SamplingConfig, choose
from .stats import DecodeStats, Generation
from .steps import StopIds, first_token, new_cache, one_prompt, sync, truncate_at_eos


class _Waiting:
    """Exited positions whose deeper blocks have not run yet (``recompute``)."""

    def __init__(self):
        self.h: list[torch.Tensor] = []       # (1, 1, d) state of each, after depth[i] blocks
        self.depth: list[int] = []            # non-increasing along the positions

    def at_depth(self, layer: int) -> int:
        """How many of the last positions wait at depth <= layer (a suffix)."""
        n = 0
        while n < len(self.depth) and self.depth[-1 - n] <= layer:
            n += 1
        return n

    def drop_complete(self, num_layers: int) -> None:
        keep = [i for i, d in enumerate(self.depth) if d < num_layers]
        self.h = [self.h[i] for i in keep]
        self.depth = [self.depth[i] for i in keep]


@torch.no_grad()
def dee_generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, cfg: DEEConfig,
                 sampling: SamplingConfig = SamplingConfig(), eos_id: StopIds = None,
                 generator: Optional[torch.Generator] = None,
                 cache: Optional[KVCache] = None,
                 classifier: Optional[ExitClassifier] = None) -> Generation:
    """Dynamic early exit of one prompt (1, T). ``cache`` (optional, sized T + new tokens)
    lets a caller inspect the keys and values the strategy left behind; ``classifier`` is
    what ``measure=classifier`` reads."""
    L = model.num_layers
    thresholds = dict(zip(cfg.checked_exits(L), cfg.validate(L)))
    if cfg.measure == "classifier":
        if classifier is None:
            raise UserError("measure=classifier needs a trained exit classifier "
                            "(python -m tinyskip.calibrate measure=classifier trains one)")
        classifier = classifier.to(prompt.device)
        missing = sorted(set(thresholds) - set(classifier.exits))
        if missing:
            raise UserError(f"the exit classifier covers exits {classifier.exits}, not the "
                            f"checked exits {missing}")
    n_new = one_prompt(model, prompt, max_new_tokens, "dee")
    T, dev = prompt.shape[1], prompt.device
    cache = cache if cache is not None else new_cache(model, prompt, n_new)
    slots = L + (model.exit_modules.cache_slots if model.exit_modules is not None else 0)
    if len(cache.k) < slots:
        raise UserError(f"the cache has {len(cache.k)} layer slots; this model with its exit "
                        f"modules needs {slots} (build it with model.new_cache)")
    head = ExitHead(model)
    module_exits = set(model.exit_modules.exit_layers) if model.exit_modules is not None else set()
    stats = DecodeStats()
    out = [first_token(model, prompt, cache, stats, sampling, generator)]
    t0 = time.perf_counter()
    stats.add_exit(L)
    waiting = _Waiting()
    _, finished = truncate_at_eos(out, eos_id)
    while len(out) < n_new and not finished:
        pos = T + len(out) - 1                     # the last token's position
        h = model.embed(torch.tensor([[out[-1]]], device=dev))           # (1, 1, d)
        conf = TokenConfidence(cfg.measure, classifier)
        exit_at, logits = L, None
        for layer in range(L):
            n = waiting.at_depth(layer) if cfg.cache == "recompute" else 0
            if n:
                # (1, n+1, d): the waiting suffix and this token, positions pos-n..pos.
                hs = model.run_layers(torch.cat(waiting.h[-n:] + [h], 1), layer, layer + 1,
                                      cache, pos - n)
                waiting.h[-n:] = list(hs[:, :-1].split(1, dim=1))
                waiting.depth[-n:] = [layer + 1] * n
                h = hs[:, -1:]
            else:
                h = model.run_layers(h, layer, layer + 1, cache, pos)
            stats.add_layers(1, width=n + 1)
            e = layer + 1
            if e not in thresholds:
                continue
            c, logits = conf.check(e, h[0, 0], lambda: head.logits(h, e, cache, pos)[0, 0])
            if cfg.measure not in HEAD_FREE:
                stats.add_head(module=e in module_exits)
            if c >= decayed_threshold(thresholds[e], len(out), n_new, cfg.decay_tau):
                exit_at = e
                break
        if logits is None or exit_at == L or cfg.measure in HEAD_FREE:
            logits = head.logits(h, exit_at, cache, pos)[0, 0]
            stats.add_head(module=exit_at in module_exits)
        out.append(int(choose(logits[None], sampling, generator)))
        stats.add_exit(exit_at)
        if exit_at < L:
            if cfg.cache == "propagate":
                model.propagate_kv(h, exit_at, L, cache, pos)
                stats.calls["kv:1"] = stats.calls.get("kv:1", 0) + (L - exit_at)
            elif cfg.cache == "copy":
                deeper = list(range(exit_at, L)) + model.module_slots_after(exit_at)
                cache.copy_up(exit_at - 1, deeper, pos)
            else:
                waiting.h.append(h)
                waiting.depth.append(exit_at)
        waiting.drop_complete(L)
        out, finished = truncate_at_eos(out, eos_id)
    sync(dev)
    stats.decode_s = time.perf_counter() - t0
    stats.new_tokens = len(out)
    return Generation([out], stats)
