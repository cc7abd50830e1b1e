"""What a training loop returns (both: from scratch and exit modules on a frozen backbone)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: list[float] = field(default_factory=list)      # train loss of every step run
    last_eval: dict = field(default_factory=dict)
