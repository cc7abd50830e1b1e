"""Primary config schemas, one per entry point (``conf/<entry>.yaml`` is typed by these)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .config import ConfigError, DataConfig, ModelConfig, TrainConfig


@dataclass
class TrainJob:
    """``python -m tinyskip.train``: the run writes to ``<checkpoint_root>/<run>/``."""

    run: Optional[str] = None
    checkpoint_root: str = "checkpoints"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def run_name(self) -> str:
        return self.run or self.model.name


@dataclass
class EvaluateJob:
    """``python -m tinyskip.evaluate run=NAME split=test [out=FILE.json]``."""

    run: Optional[str] = None
    checkpoint: Optional[str] = None          # an explicit checkpoint or run folder
    checkpoint_root: str = "checkpoints"
    split: str = "test"
    out: Optional[str] = None
    seq_len: Optional[int] = None             # None: the run's training seq_len
    batch_size: int = 16
    max_batches: int = 0                      # 0 = the whole split
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        if self.split not in ("train", "validation", "test"):
            raise ConfigError(f"split={self.split!r}: must be one of train, validation, test")
        if self.run is None and self.checkpoint is None:
            raise ConfigError("give run=<name> (a folder under checkpoint_root) or "
                              "checkpoint=<path>")


SCHEMAS: dict[str, type] = {"train": TrainJob, "evaluate": EvaluateJob}
