"""A continual run's checkpoint (layout: checkpoint.py): the model as Hugging Face Llama
files, and what the run carries from the pretrained model it started from (its tokenizer
files, ``source.json``), so that it loads through the Llama shim as that model does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch

from ..model.transformer import Transformer
from .checkpoint import CHECKPOINT, SOURCE, CheckpointError, read_json, save_run_folder
from .hf_llama import TOKENIZER_FILES, write_hf_model


def carried_files(folder: Path, source: dict) -> dict[str, bytes]:
    """What every save writes beside the weights: the tokenizer files of ``folder`` and
    ``source`` as source.json. Read once, into memory: a resumed run's first save
    replaces the checkpoint folder they were read from."""
    files = {name: (folder / name).read_bytes() for name in TOKENIZER_FILES
             if (folder / name).is_file()}
    files[SOURCE] = json.dumps(source, indent=1).encode()
    return files


def save_continual_checkpoint(run_dir: Path, model: Transformer, carried: dict[str, bytes],
                              train_state: Optional[dict] = None,
                              also: Optional[Callable[[Path], None]] = None) -> Path:
    """``<run>/checkpoint/`` in Hugging Face layout with the ``carried`` files, atomically
    (as ``save_checkpoint``: fp32 weights, the train state, ``also``'s files)."""
    def fill(tmp: Path) -> None:
        write_hf_model(model, tmp)
        for name, data in carried.items():
            (tmp / name).write_bytes(data)
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
        if also is not None:
            also(tmp)

    return save_run_folder(run_dir, CHECKPOINT, fill)


def read_source(ckpt: Path) -> Optional[dict]:
    """The pretrained model a checkpoint's run started from ({"path", "weights_hash"}),
    None for a run trained from scratch."""
    path = Path(ckpt) / SOURCE
    if not path.is_file():
        return None
    source = read_json(path)
    if not (isinstance(source, dict) and isinstance(source.get("weights_hash"), str)
            and isinstance(source.get("path"), str)):
        raise CheckpointError(f"{path} is corrupted (no path or weights_hash)")
    return source
