"""What one generation returns: the tokens and the counters that price it."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional


def _add_hist(a: list[int], b: list[int]) -> list[int]:
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)]


@dataclass
class DecodeStats:
    """Counters of one generation (or, summed with ``+``, of many).

    ``calls`` counts block, head and exit-module calls by how many tokens each processed
    ("layer:3" = a block run on 3 positions at once; a head call over a small draft
    vocabulary counts as its fraction of a full-vocabulary call), so a benchmark can predict the cost from
    unit costs measured per width. ``exit_hist[e]`` counts tokens that left at exit e
    (blocks run, 1..L; DEE, static and full fill it).
    """

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0            # the new tokens' time, compiling graphs not counted
    compile_s: float = 0.0           # calls that compiled a graph first (see Steps)
    calls: dict[str, float] = field(default_factory=dict)
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    accept_hist: list[int] = field(default_factory=list)   # rounds by accepted drafts
    lookup_rounds: int = 0           # SSD rounds that drafted by prompt lookup (ngram)
    exit_hist: list[int] = field(default_factory=list)     # tokens by exit (index = blocks run)
    # SSD with choose=del: rounds by the exit that drafted them (L: a full step, no drafts)
    # and by the drafts they made (index = drafts).
    exit_rounds: dict[int, int] = field(default_factory=dict)
    draft_hist: list[int] = field(default_factory=list)

    def add_layers(self, blocks: int, width: int = 1) -> None:
        key = f"layer:{width}"
        self.calls[key] = self.calls.get(key, 0) + blocks

    def add_head(self, width: int = 1, cost: float = 1.0, module: bool = False) -> None:
        """One head call on ``width`` positions (``cost``: its share of a full-vocabulary
        call); ``module``: through an exit module, counted too as a "module:width" call."""
        key = f"head:{width}"
        self.calls[key] = self.calls.get(key, 0) + cost
        if module:
            self.add_module(width)

    def add_module(self, width: int = 1) -> None:
        """One exit-module call on ``width`` positions."""
        key = f"module:{width}"
        self.calls[key] = self.calls.get(key, 0) + 1

    def add_choice(self, exit: int, drafts: int) -> None:
        """One SSD round that drafted ``drafts`` tokens from ``exit`` (del's choice)."""
        self.exit_rounds[exit] = self.exit_rounds.get(exit, 0) + 1
        self.draft_hist = _add_hist(self.draft_hist, [0] * drafts + [1])

    def add_exit(self, exit: int, count: int = 1) -> None:
        self.exit_hist = _add_hist(self.exit_hist, [0] * exit + [count])

    def __add__(self, other: "DecodeStats") -> "DecodeStats":
        out = DecodeStats()
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, dict):
                value = dict(a)
                for k, v in b.items():
                    value[k] = value.get(k, 0) + v
            elif isinstance(a, list):
                value = _add_hist(a, b)
            else:
                value = a + b
            setattr(out, f.name, value)
        return out

    def _evals(self, kind: str) -> float:
        """Token-level evaluations: a call on w positions counts w."""
        return sum(int(k.split(":")[1]) * n for k, n in self.calls.items()
                   if k.startswith(kind + ":"))

    @property
    def layer_evals(self) -> float:
        return self._evals("layer")

    @property
    def head_evals(self) -> float:
        return self._evals("head")

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def mean_exit(self) -> Optional[float]:
        n = sum(self.exit_hist)
        return sum(e * c for e, c in enumerate(self.exit_hist)) / n if n else None

    def as_dict(self) -> dict:
        n = max(self.new_tokens, 1)
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(tokens_per_s=self.tokens_per_s, layers_per_token=self.layer_evals / n,
                 heads_per_token=self.head_evals / n)
        if self.drafted:
            d.update(acceptance=self.accepted / self.drafted,
                     mean_accepted=self.accepted / max(self.rounds, 1))
        if self.exit_hist:
            d.update(mean_exit=self.mean_exit)
        return d


@dataclass
class Generation:
    tokens: list[list[int]]          # new tokens of every batch row (up to EOS, inclusive)
    stats: DecodeStats
