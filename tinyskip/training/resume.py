"""What ``train.resume=true`` must find: the same recipe and model as the saved run,
and a metrics log cut back to the checkpoint it continues from; and what a fresh run
must not find: a saved one."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

from ..atomic import write_text_atomic
from ..config import ModelConfig, TrainConfig
from ..jobs import TrainJob
from ..storage.checkpoint import CHECKPOINT, CheckpointError, load_run_job
from ..storage.sharded_checkpoint import sharded

# Keys that change how a run is executed or reported, never what it computes: they may
# differ on resume. Everything else under data. and train. is the recipe. The model is
# checked against the checkpoint's own config.json (check_model).
RUNTIME_KEYS = {"data.cache_dir", "train.device", "train.compile", "train.eval_every",
                "train.eval_batches", "train.log_every", "train.save_every", "train.resume",
                "train.overwrite", "train.exit_cache", "train.exit_cache_dir",
                "train.tensorboard", "train.parallel"}
# Why a changed max_steps is not "train longer": the schedules are functions of t / T.
DEPENDS_ON = {"train.max_steps": "the cosine LR schedule, LayerDrop's S(t) and the gradual "
                                 "curriculum are functions of step / max_steps"}


# Keys a run's job.json may hold under an earlier name: compared under today's.
RENAMED = {"train.exit_scale": "train.exit_weighting"}


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _same(key: str, saved, given) -> bool:
    if saved == given:
        return True
    # One local data folder named two ways (relative, absolute) is the same data.
    if key == "data.path":
        try:
            return os.path.samefile(os.path.expanduser(saved), os.path.expanduser(given))
        except (OSError, TypeError):
            return False
    return False


def check_recipe(job: TrainJob, run_dir: Path) -> None:
    """Refuse to continue a run with another recipe than its job.json records."""
    saved = load_run_job(run_dir)
    if saved is None:
        warnings.warn(f"{run_dir} has no job.json: resuming without checking that the "
                      "recipe (data, train.*) is the one the run started with")
        return
    old = {RENAMED.get(k, k): v for k, v in _flatten(saved).items()
           if k.startswith(("data.", "train."))}
    new = _flatten(dataclasses.asdict(job))
    changed = [k for k in old if k in new and k not in RUNTIME_KEYS
               and not _same(k, old[k], new[k])]
    if changed:
        what = "; ".join(f"{k}: {old[k]!r} -> {new[k]!r}"
                         + (f" ({DEPENDS_ON[k]})" if k in DEPENDS_ON else "") for k in changed)
        raise CheckpointError(f"train.resume=true with another recipe than {run_dir}/job.json: "
                              f"{what}; resume with the saved values, or start a new run=<name>")


def check_fresh(run_dir: Path, tc: TrainConfig) -> None:
    """A fresh run never silently replaces a saved one. (The fallback .checkpoint-old
    counts: a crash mid-save can leave it as the only one.)"""
    existing = [p.name for p in (run_dir / CHECKPOINT, run_dir / f".{CHECKPOINT}-old")
                if p.exists()]
    if existing and not tc.overwrite:
        raise CheckpointError(f"run folder {run_dir} already holds a checkpoint ({existing[0]}): "
                              "pass train.resume=true to continue it, train.overwrite=true to "
                              "start over, or another run=<name>")


def check_layout(folder: Path, tc: TrainConfig) -> bool:
    """Whether the checkpoint a resume continues is sharded (complete, or refused). Its
    shards load into any layout, whole included; a whole optimizer state is not loaded
    into shards (``train.parallel`` is runtime: this is the one way it matters)."""
    is_sharded = sharded(folder)
    if tc.parallel == "fsdp" and not is_sharded:
        raise CheckpointError(f"train.parallel=fsdp cannot resume {folder}: it was saved by a "
                              "ddp or one-process run (its optimizer state is whole, not "
                              "sharded); resume it with train.parallel=ddp")
    return is_sharded


def check_model(job: TrainJob, saved: ModelConfig, run_dir: Path) -> None:
    """The model config asked for must be the checkpoint's (the tokenizer's ids aside)."""
    wanted = dataclasses.replace(job.model, vocab_size=saved.vocab_size,
                                 bos_token_id=saved.bos_token_id,
                                 eos_token_id=saved.eos_token_id)
    if wanted != saved:
        diff = [f.name for f in dataclasses.fields(saved)
                if getattr(saved, f.name) != getattr(wanted, f.name)]
        raise CheckpointError(f"train.resume=true with a model config that differs from "
                              f"the checkpoint in {run_dir} (fields {diff})")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop evaluations after ``step`` (the resumed run redoes them) and lines that do
    not parse (a write torn by a kill or a full disk), with one warning."""
    if not path.exists():
        return
    keep, torn = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            row_step = row["step"]
        except (json.JSONDecodeError, TypeError, KeyError):
            torn += 1
            continue
        if row_step <= step:
            keep.append(line)
    if torn:
        warnings.warn(f"{path}: dropped {torn} line(s) that do not parse (a write cut short)")
    write_text_atomic(path, "".join(line + "\n" for line in keep))
