"""Read the files the entry points write, for notebooks and reports: a run's training
metrics, an evaluation, a calibration file, a benchmark's results folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from ..storage.checkpoint import read_json

# read_json is the readers' too (the notebooks import it from here).
__all__ = ["read_json", "read_metrics", "bench_results"]

PathLike = Union[str, Path]


def read_metrics(run_dir: PathLike) -> list[dict]:
    """``<run>/metrics.jsonl``: one object per evaluation during training."""
    text = (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def bench_results(folder: PathLike) -> tuple[Path, dict]:
    """A benchmark's results: ``folder`` itself when it holds ``results.json``, else its
    newest sub-folder that does (``logs/bench/<run>`` -> its latest sweep)."""
    folder = Path(folder)
    if not (folder / "results.json").is_file():
        found = sorted(p.parent for p in folder.glob("*/results.json"))
        if not found:
            raise FileNotFoundError(f"no results.json in {folder} or its sub-folders "
                                    "(python -m tinyskip.bench writes them)")
        folder = found[-1]
    return folder, read_json(folder / "results.json")
