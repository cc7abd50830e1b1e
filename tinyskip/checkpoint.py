"""Self-describing checkpoint folders, written atomically.

A run folder ``checkpoints/<run>/`` holds ``metrics.jsonl``, ``job.json`` (the composed
training config) and ``checkpoint/``, the folder every other entry point loads:

    checkpoint/config.json        model config (tinyskip ModelConfig fields)
    checkpoint/model.safetensors  weights (tied embeddings stored once)
    checkpoint/tokenizer.model    SentencePiece tokenizer
    checkpoint/train_state.pt     step, optimizer and RNG state (tensors only)

A save writes a complete new folder beside the old one and swaps it in with renames,
so a crash at any moment leaves either the old or the new checkpoint, never a mix.
Nothing is unpickled: weights come from safetensors and the training state is read
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig, UserError
from .model import Transformer

CHECKPOINT = "checkpoint"
FILES = ("config.json", "model.safetensors", "tokenizer.model")


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete or does not match what was asked."""


def write_json_atomic(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.chmod(tmp, 0o644)             # mkstemp makes it private; results are shareable
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, model: Transformer, tokenizer_file: Path,
                    train_state: Optional[dict] = None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    final, old = run_dir / CHECKPOINT, run_dir / f".{CHECKPOINT}-old"
    for stale in run_dir.glob(f".{CHECKPOINT}-tmp-*"):     # left by a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{CHECKPOINT}-tmp-"))
    tmp.chmod(0o755)                 # mkdtemp makes it private; a checkpoint is shareable
    (tmp / "config.json").write_text(json.dumps(model.config.to_dict(), indent=1))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)     # tied: stored once, as embed_tokens.weight
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(tokenizer_file, tmp / "tokenizer.model")
    if train_state is not None:
        torch.save(train_state, tmp / "train_state.pt")
    # Swap: final -> old, tmp -> final, drop old. A crash between the renames leaves
    # `old` complete, and resolve_checkpoint falls back to it; so `old` is only dropped
    # while a complete `final` exists.
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_checkpoint(path: Path | str) -> Path:
    """A checkpoint folder, given it or the run folder that holds it."""
    path = Path(path)
    for candidate in (path, path / CHECKPOINT, path / f".{CHECKPOINT}-old"):
        if (candidate / "config.json").is_file():
            missing = [f for f in FILES if not (candidate / f).is_file()]
            if missing:
                raise CheckpointError(f"checkpoint {candidate} is incomplete: missing {missing}")
            return candidate
    raise CheckpointError(f"no checkpoint at {path} (expected {path}/{CHECKPOINT}/config.json; "
                          "train one with python -m tinyskip.train run=<name>)")


def weights_hash(ckpt: Path) -> str:
    """sha256 of a checkpoint's weights file: what results made with it are keyed by."""
    h = hashlib.sha256()
    with open(ckpt / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_model_config(ckpt: Path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(json.loads((ckpt / "config.json").read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: config.json is corrupted ({e})")


def load_model(path: Path | str, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[Transformer, Path]:
    """Rebuild the model from a checkpoint's own config and load its weights."""
    ckpt = resolve_checkpoint(path)
    cfg = load_model_config(ckpt)
    try:
        state = load_file(str(ckpt / "model.safetensors"), device=str(device))
    except Exception as e:  # safetensors raises its own error types on corrupt files
        raise CheckpointError(f"checkpoint {ckpt}: model.safetensors is unreadable ({e})")
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    if set(state) != expected:
        diff = sorted(set(state) ^ expected)[:4]
        raise CheckpointError(f"checkpoint {ckpt}: weights do not match its config.json "
                              f"(differing tensors: {diff})")
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {ckpt}: weights do not match its config.json "
                              f"({str(e).splitlines()[-1].strip()})")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.reset_rope(device)
    return model.to(dtype).eval(), ckpt


def load_train_state(ckpt: Path) -> dict:
    path = ckpt / "train_state.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} has no train_state.pt: it cannot be resumed")
    return torch.load(path, map_location="cpu", weights_only=True)
