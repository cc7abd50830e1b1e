"""Decoding: the modes users pick by name (``mode=full|static|ssd|dee``) and their loops.

    sampling.py    temperature / top-k / top-p, the next-token choice, speculative acceptance
    stats.py       DecodeStats (summable with +) and Generation
    steps.py       input checks, cache, prefill, and the per-token steps (eager or compiled)
    confidence.py  the confidence measures (DEE and SSD's adaptive drafting)
    full.py        full and static-exit decoding
    ssd.py         self-speculative decoding
    ssd_batch.py   self-speculative decoding of several prompts together (ragged positions)
    dee.py         dynamic early exit
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..config import MODES, DEEConfig, SSDConfig, check_mode
from ..model.exit_classifier import ExitClassifier
from ..model.transformer import Transformer
from .dee import dee_generate
from .full import check_exit_layer, generate
from .sampling import SamplingConfig
from .ssd import ssd_generate
from .stats import DecodeStats, Generation
from .steps import Steps, StopIds


@dataclass
class ModeSpec:
    mode: str = "full"
    exit_layer: Optional[int] = None        # static
    ssd: Optional[SSDConfig] = None         # ssd
    dee: Optional[DEEConfig] = None         # dee
    classifier: Optional[ExitClassifier] = None   # dee with measure=classifier

    def __post_init__(self) -> None:
        check_mode(self.mode)

    def validate(self, num_layers: int) -> None:
        """Check the mode's options against the model, once per generation run."""
        if self.mode == "static":
            check_exit_layer(self.exit_layer, num_layers)
        if self.ssd is not None:
            self.ssd.validate(num_layers)
        if self.dee is not None:
            self.dee.validate(num_layers)

    @property
    def label(self) -> str:
        if self.mode == "static":
            return f"static E={self.exit_layer}"
        if self.mode == "ssd":
            s = self.ssd
            extra = (f" vocab={s.draft_vocab}" if s.draft_vocab else "") + \
                    (f" adapt={s.adaptive_threshold}" if s.adaptive_threshold else "") + \
                    (f" ngram={s.ngram}" if s.ngram else "") + \
                    (f" ngram_k={s.ngram_k}" if s.ngram_k else "")
            if s.choose == "del":
                exits = ",".join(map(str, s.exits)) or "modules"
                first = f" E={s.draft_layer}" if s.draft_layer is not None else ""
                return f"ssd del exits={exits}{first} k={s.k}{extra}"
            return f"ssd E={s.draft_layer} k={s.k}{extra}"
        if self.mode == "dee":
            d = self.dee
            thr = ",".join(f"{t:g}" for t in d.threshold)
            return f"dee {d.measure}>={thr} {d.cache}" + (f" tau={d.decay_tau:g}" if d.decay_tau else "")
        return "full"


def decode(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, spec: ModeSpec,
           sampling: SamplingConfig = SamplingConfig(), eos_id: StopIds = None,
           generator: Optional[torch.Generator] = None,
           draft_ids: Optional[torch.Tensor] = None, steps: Optional[Steps] = None,
           lengths: Optional[torch.Tensor] = None) -> Generation:
    """One generation in the mode ``spec`` names; ``steps`` (compiled or not) is shared by
    the calls of a session so that compiled graphs are reused. ``prompt`` (B, T): with
    ``lengths`` (B,), prompts of their own lengths, right-padded (``ragged_batch``)."""
    if spec.mode == "full":
        return generate(model, prompt, max_new_tokens, None, sampling, eos_id, generator, steps,
                        lengths)
    if spec.mode == "static":
        return generate(model, prompt, max_new_tokens, spec.exit_layer, sampling, eos_id,
                        generator, steps, lengths)
    if spec.mode == "dee":
        return dee_generate(model, prompt, max_new_tokens, spec.dee, sampling, eos_id, generator,
                            classifier=spec.classifier)
    return ssd_generate(model, prompt, max_new_tokens, spec.ssd, sampling, eos_id, generator,
                        draft_ids, steps, lengths)


__all__ = ["MODES", "ModeSpec", "decode", "generate", "ssd_generate", "dee_generate",
           "SamplingConfig", "DecodeStats", "Generation", "Steps"]
