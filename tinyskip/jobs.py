"""Primary config schemas, one per entry point (``conf/<entry>.yaml`` is typed by these)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .config import DataConfig, ModelConfig, TrainConfig


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


SCHEMAS: dict[str, type] = {"train": TrainJob}
