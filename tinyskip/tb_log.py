"""TensorBoard event files beside a run's own records (``train.tensorboard=true``,
``python -m tinyskip.bench tensorboard=true``): scalars only, through torch's
``SummaryWriter``, into ``<folder>/tensorboard/``.

tensorboard is an optional package (``.[tensorboard]``): it is imported only where the
option is on, and the jobs check for it when they start (``require_tensorboard``), not
at the first evaluation hours later.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from .config import UserError


def require_tensorboard(option: str) -> None:
    """One line naming ``option`` when the tensorboard package is missing."""
    try:
        importlib.import_module("torch.utils.tensorboard")
    except ImportError:
        raise UserError(f"{option}=true needs the tensorboard package: "
                        "pip install -e '.[tensorboard]'") from None


class ScalarLog:
    """Scalars into event files in ``<folder>/tensorboard/`` (one file per writer: a
    resumed run adds its own beside the earlier ones, and TensorBoard reads them all as
    one run).

    ``purge_step``: TensorBoard hides what the folder's earlier files logged at this step
    or later. Training logs a point at step s after s steps and passes its checkpoint's
    step + 1 (1 when fresh): a resumed run redoes the steps after its checkpoint, so what
    the interrupted run logged past it is hidden, as ``truncate_metrics`` drops it from
    metrics.jsonl, without a second point per step; a fresh run hides everything a run
    it replaces logged, as its metrics.jsonl starts empty."""

    def __init__(self, folder: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder / "tensorboard"), purge_step=purge_step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def eval_scalars(row: dict) -> dict[str, float]:
    """An evaluation's metrics.jsonl row as tags: each per-exit list under
    ``val/<name>/exit_<e>`` (exit e: the head on block e's output; the lists run 1..L)."""
    return {f"val/{key[len('val_'):]}/exit_{e}": value
            for key in ("val_loss", "val_word_ppl", "val_agreement", "val_p_last_top")
            for e, value in enumerate(row[key], 1)}
