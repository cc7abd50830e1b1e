"""Choosing each SSD round's draft exit and number of drafts (``choose=del``), after DEL
(arXiv 2504.05598), which picks both per context from the exits' running acceptance.

Estimates. After each round's verify the full model's tokens at the committed positions
are known, and ssd.py measures, for every candidate exit e, whether what drafting from e
would propose there (greedy, through e's module and the draft head) equals them. alpha_e,
the running agreement of exit e, is an exponentially weighted mean of those 0/1 samples:
a round's n samples with mean x move it to

    alpha_e <- (1 - w)^n alpha_e + (1 - (1 - w)^n) x          (w = WEIGHT per sample)

from the prior alpha_e = e / L (deeper exits agree more; exit L always does).

Cost. Where early exit pays, decoding is bound by reading the weights, so a call costs
the bytes of the weights it reads, whatever its width. A round that drafts gamma tokens
from exit e reads

    c_draft(e) = bytes of blocks [0, e) + e's module + the draft head      per draft,
    c_verify   = bytes of blocks [0, L) + the full head + the probe        once:

the verify runs blocks [e, L) over the round's positions and, before them, blocks [0, e)
on the last draft alone (ssd.py), so it reads every block once whatever e; the probe
(ssd.py) reads the draft head and the candidates' modules once. gamma = 0 is a plain full
step, cost c_verify.

Choice. With acceptance alpha, a round of gamma drafts commits on average
N = (1 - alpha^(gamma+1)) / (1 - alpha) tokens (gamma + 1 when alpha = 1); the chooser
takes the (e, gamma), gamma in 0..k, with the most tokens per byte, N / (gamma c_draft(e)
+ c_verify). When no exit agrees enough to pay, that is gamma = 0: full decoding, whose
rounds still measure every exit, so drafting resumes when one starts to agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..model.exits import ExitHead
from ..model.quantize import module_bytes
from ..model.transformer import Transformer

# Weight of one agreement sample. A round gives 1..k+1 samples per exit (a lookup round up
# to ngram_k+1: repeated text, which is easy for every exit, then weighs more), so 0.1
# forgets a sample's weight by half in about 7 samples, two to four rounds: quick enough to follow
# the text from one phrase to the next (DEL's point: acceptance depends on the context),
# slow enough that one unlucky round does not switch exits.
WEIGHT = 0.1


@dataclass
class RoundCosts:
    """The bytes a round reads: per draft from each exit, and once for the verify."""

    draft: dict[int, float]
    verify: float


def round_costs(model: Transformer, exits: list[int], draft: ExitHead) -> RoundCosts:
    """``RoundCosts`` of drafting from ``exits`` with the head ``draft`` on this model's
    weights as stored (int8 ones count a byte)."""
    blocks = [module_bytes(layer) for layer in model.layers]
    head = module_bytes(model.lm_head) + module_bytes(model.norm)
    # (a bare exit has no module: the final norm, counted with the head)
    modules = {e: module_bytes(model.exit_module(e) or nn.Identity()) for e in exits}
    draft_head = draft.cost * head
    return RoundCosts({e: sum(blocks[:e]) + modules[e] + draft_head for e in exits},
                      sum(blocks) + head + draft_head + sum(modules.values()))


def expected_tokens(alpha: float, drafts: int) -> float:
    """Tokens a round of ``drafts`` drafts commits on average at acceptance ``alpha``."""
    if alpha >= 1.0:
        return drafts + 1.0
    return (1.0 - alpha ** (drafts + 1)) / (1.0 - alpha)


class DraftChooser:
    """Running agreement of each candidate exit, and the round each asks for."""

    def __init__(self, exits: list[int], max_drafts: int, costs: RoundCosts, num_layers: int):
        self.exits, self.max_drafts, self.costs = list(exits), max_drafts, costs
        self.alpha = {e: e / num_layers for e in exits}

    def update(self, exit: int, agree: list[bool]) -> None:
        """Fold one round's samples of ``exit`` (its proposal equalled the full model's
        token, position by position) into its running agreement."""
        if not agree:
            return
        keep = (1.0 - WEIGHT) ** len(agree)
        self.alpha[exit] = keep * self.alpha[exit] + (1.0 - keep) * sum(agree) / len(agree)

    def choose(self) -> tuple[int, int]:
        """(exit, drafts) with the most expected tokens per byte read; drafts = 0 means a
        full step (its exit is then the first candidate: none drafts). Ties go to the
        shallower exit and the fewer drafts."""
        best, choice = -1.0, (self.exits[0], 0)
        for e in self.exits:
            for drafts in range(self.max_drafts + 1):
                value = expected_tokens(self.alpha[e], drafts) / (
                    drafts * self.costs.draft[e] + self.costs.verify)
                if value > best:
                    best, choice = value, (e, drafts)
        return choice
