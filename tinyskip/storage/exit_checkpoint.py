"""Exit-module runs on disk: the modules alone plus a reference to their frozen backbone.

A run trained with ``train=balcony`` holds, beside ``job.json`` and ``metrics.jsonl``:

    exits/exit_modules.json         kind, exit layers, and the backbone: its path and
                                    weight hash (a tinyskip checkpoint or a Hugging
                                    Face Llama folder)
    exits/exit_modules.safetensors  the modules' weights only (an 8B backbone is never copied)
    exits/train_state.pt            step and optimizer state (tensors only)

Saved like a checkpoint (complete new folder, then renames). Loading checks the
backbone's weight hash, so modules never meet a backbone they were not trained on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from ..model.exit_modules import ExitModules
from .checkpoint import CheckpointError, file_hash, read_json, save_run_folder
from .hf_llama import weight_files

EXITS = "exits"
META, WEIGHTS = "exit_modules.json", "exit_modules.safetensors"


def backbone_hash(folder: Path) -> str:
    """sha256 of a backbone's weight files in name order: a tinyskip checkpoint's
    model.safetensors (= ``weights_hash``), or every shard of a Hugging Face folder."""
    return file_hash(*weight_files(Path(folder)))


def exits_folder(path: Path) -> Optional[Path]:
    """The ``exits/`` folder of a run folder (or the folder itself), None when absent."""
    path = Path(path)
    for candidate in (path, path / EXITS, path / f".{EXITS}-old"):
        if (candidate / META).is_file():
            return candidate
    return None


def save_exit_modules(run_dir: Path, modules: ExitModules, backbone: dict,
                      train_state: Optional[dict] = None,
                      also: Optional[Callable[[Path], None]] = None) -> Path:
    """Write ``<run>/exits/`` atomically; ``backbone`` = {"path", "format", "weights_hash"};
    ``also(folder)``: more files for it (a sharded run's shards)."""
    def fill(tmp: Path) -> None:
        meta = {"kind": modules.kind, "exit_layers": modules.exit_layers, "backbone": backbone}
        (tmp / META).write_text(json.dumps(meta, indent=1))
        state = {k: v.detach().contiguous() for k, v in modules.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
        if also is not None:
            also(tmp)

    return save_run_folder(run_dir, EXITS, fill)


def read_exit_meta(folder: Path) -> dict:
    meta = read_json(folder / META)
    try:
        kind, layers, bb = meta["kind"], meta["exit_layers"], meta["backbone"]
        if not (isinstance(kind, str) and isinstance(layers, list) and isinstance(bb, dict)
                and {"path", "format", "weights_hash"} <= set(bb)):
            raise TypeError("a field has the wrong type")
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{folder / META} is corrupted ({e})")
    return meta


def load_exit_modules(folder: Path, backbone, backbone_digest: str) -> ExitModules:
    """The modules of an ``exits/`` folder for ``backbone`` (refused for other weights)."""
    meta = read_exit_meta(folder)
    want = meta["backbone"]["weights_hash"]
    if want != backbone_digest:
        raise CheckpointError(f"exit modules in {folder} were trained on a backbone with weight "
                              f"hash {want[:12]}..., not this one ({backbone_digest[:12]}...)")
    if meta["backbone"]["format"] not in ("tinyskip", "hf"):
        raise CheckpointError(f"{folder / META} is corrupted (backbone format "
                              f"{meta['backbone']['format']!r})")
    modules = ExitModules(backbone.config, meta["exit_layers"], meta["kind"])
    try:
        state = load_file(str(folder / WEIGHTS))
        modules.load_state_dict(state)
    except Exception as e:  # safetensors' own errors, or tensors that do not fit
        raise CheckpointError(f"{folder / WEIGHTS} does not hold these exit modules "
                              f"({(str(e).strip().splitlines() or [type(e).__name__])[-1]})")
    return modules


def exit_modules_hash(folder: Path) -> str:
    return file_hash(folder / WEIGHTS)
