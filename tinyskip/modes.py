"""Decoding modes dispatched explicitly by name (``mode=full|static|ssd``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .config import UserError
from .generate import Generation, SamplingConfig, generate
from .model import Transformer
from .ssd import SSDConfig, ssd_generate

MODES = ("full", "static", "ssd")


@dataclass
class ModeSpec:
    mode: str = "full"
    exit_layer: Optional[int] = None        # static
    ssd: Optional[SSDConfig] = None         # ssd

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"mode={self.mode!r}: must be one of {', '.join(MODES)}")

    @property
    def label(self) -> str:
        if self.mode == "static":
            return f"static E={self.exit_layer}"
        if self.mode == "ssd":
            s = self.ssd
            extra = (f" vocab={s.draft_vocab}" if s.draft_vocab else "") + \
                    (f" adapt={s.adaptive_threshold}" if s.adaptive_threshold else "")
            return f"ssd E={s.draft_layer} k={s.k}{extra}"
        return "full"


def decode(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, spec: ModeSpec,
           sampling: SamplingConfig = SamplingConfig(), eos_id: Optional[int] = None,
           generator: Optional[torch.Generator] = None,
           draft_ids: Optional[torch.Tensor] = None) -> Generation:
    if spec.mode == "full":
        return generate(model, prompt, max_new_tokens, None, sampling, eos_id, generator)
    if spec.mode == "static":
        return generate(model, prompt, max_new_tokens, spec.exit_layer, sampling, eos_id, generator)
    return ssd_generate(model, prompt, max_new_tokens, spec.ssd, sampling, eos_id, generator,
                        draft_ids)
