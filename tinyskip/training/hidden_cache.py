"""The frozen backbone's hidden states, computed once for offline exit-module training.

For training step s the batch is a function of (seed, s) (``data.get_batch``), so the
cache holds, per step, the backbone's states at the exits and its last block's output:
one memory-mapped array ``states.bin`` of shape (steps, n_exits + 1, B, T, d). The KL
target is rebuilt from the cached last-block state by the frozen final norm and head:
exact, and d / V of the size of caching logits (1/31 at d 256, V 8000 as at d 4096,
V 128256), with no top-k truncation of the teacher.

The cache is keyed by everything its content depends on (backbone weight hash, data
settings, exits, batch shape, seed, steps, dtype): a matching cache is reused, and a
folder named explicitly that was made for anything else is refused. It is built in a
temporary folder and renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..atomic import make_dirs, publish_dir, temp_dir
from ..runtime import progress_bar
from ..storage.checkpoint import CheckpointError

# numpy has no bfloat16: such caches hold the raw 16-bit patterns.
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}


def cache_meta(backbone_hash: str, data: dict, exit_layers: list[int], batch_size: int,
               seq_len: int, seed: int, steps: int, hidden_size: int, dtype: torch.dtype) -> dict:
    return {"backbone_hash": backbone_hash, "data": data, "exit_layers": sorted(exit_layers),
            "batch_size": batch_size, "seq_len": seq_len, "seed": seed, "steps": steps,
            "hidden_size": hidden_size, "dtype": str(dtype).removeprefix("torch.")}


def cache_key(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


class HiddenCache:
    def __init__(self, folder: Path, meta: dict):
        self.folder, self.meta = folder, meta
        self.dtype = getattr(torch, meta["dtype"])
        shape = (meta["steps"], len(meta["exit_layers"]) + 1, meta["batch_size"],
                 meta["seq_len"], meta["hidden_size"])
        self.array = np.memmap(folder / "states.bin", dtype=_NUMPY[self.dtype], mode="r",
                               shape=shape)

    def read(self, step: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """States at the exits (n, B, T, d) and the last block's output (B, T, d) of a step."""
        t = torch.from_numpy(np.array(self.array[step]))      # a copy: the map is read-only
        if self.dtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        t = t.to(device)
        return t[:-1], t[-1]


def _mismatch(saved: dict, wanted: dict) -> str:
    if saved.get("backbone_hash") != wanted["backbone_hash"]:
        return (f"made for another backbone (weight hash {str(saved.get('backbone_hash'))[:12]}..., "
                f"this one {wanted['backbone_hash'][:12]}...)")
    diff = [k for k in wanted if saved.get(k) != wanted[k]]
    return f"made for other data or settings ({', '.join(diff)} differ)"


def open_or_build(folder: Path, meta: dict, explicit: bool,
                  states_of: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
                  progress: bool = True) -> tuple[HiddenCache, bool]:
    """The cache in ``folder`` (reused when its meta matches, refused when a folder named
    by the user does not), else built by calling ``states_of(step)`` for every step.
    Returns the cache and whether it was built now."""
    named = f"train.exit_cache_dir={str(folder)!r}"
    if (folder / "meta.json").is_file():
        try:
            saved = json.loads((folder / "meta.json").read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            saved = {}
        if saved == meta:
            return HiddenCache(folder, meta), False
        if explicit:
            raise CheckpointError(f"{named}: this hidden-state cache was {_mismatch(saved, meta)}")
    elif explicit and folder.exists() and any(folder.iterdir()):
        raise CheckpointError(f"{named} is not a hidden-state cache (no meta.json) and is not empty")
    shape = (meta["steps"], len(meta["exit_layers"]) + 1, meta["batch_size"], meta["seq_len"],
             meta["hidden_size"])
    dtype = getattr(torch, meta["dtype"])
    need = int(np.prod(shape)) * np.dtype(_NUMPY[dtype]).itemsize
    make_dirs(folder.parent)
    free = shutil.disk_usage(folder.parent).free
    if need > free:           # a memmap that outgrows the disk dies of SIGBUS, not an error
        raise CheckpointError(f"the hidden-state cache needs {need / 2**30:.1f} GiB and "
                              f"{folder.parent} has {free / 2**30:.1f} GiB free")
    for stale in folder.parent.glob(f".{folder.name}-tmp-*"):     # left by a crash
        shutil.rmtree(stale, ignore_errors=True)
    tmp = temp_dir(folder.parent, f".{folder.name}-tmp-")
    try:
        array = np.memmap(tmp / "states.bin", dtype=_NUMPY[dtype], mode="w+", shape=shape)
        steps = range(meta["steps"])
        if progress:
            steps = progress_bar(steps, desc="hidden-state cache")
        for step in steps:
            exits, last = states_of(step)                        # (n, B, T, d), (B, T, d)
            both = torch.cat([exits, last[None]]).to(dtype).cpu()
            array[step] = (both.view(torch.int16) if dtype == torch.bfloat16 else both).numpy()
        array.flush()
        del array
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        # What stands at the destination now is empty, stale or unreadable (a match was
        # returned above, a foreign cache named by the user refused): replace it.
        if folder.exists():
            shutil.rmtree(folder)
        publish_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return HiddenCache(folder, meta), True
