"""Self-describing checkpoint folders, written atomically.

A run folder ``checkpoints/<run>/`` holds ``metrics.jsonl``, ``job.json`` (the composed
training config) and ``checkpoint/``, the folder every other entry point loads:

    checkpoint/config.json        model config (tinyskip ModelConfig fields)
    checkpoint/model.safetensors  weights (tied embeddings stored once)
    checkpoint/tokenizer.model    SentencePiece tokenizer
    checkpoint/train_state.pt     step, optimizer and RNG state (tensors only)

(a ``train.parallel=fsdp`` run's checkpoint adds its shards: sharded_checkpoint.py)

A continual run (a pretrained Hugging Face Llama trained further: training/continual.py)
keeps its checkpoint in Hugging Face's layout instead, so that it loads through the
Llama shim with the pretrained model's own tokenizer:

    checkpoint/config.json, model.safetensors, generation_config.json   (hf_llama.py)
    checkpoint/tokenizer.json, tokenizer_config.json, ...               (copied as they are)
    checkpoint/source.json        the pretrained model it started from: path, weight hash
    checkpoint/train_state.pt

A save writes a complete new folder beside the old one and swaps it in with renames,
so a crash at any moment leaves either the old or the new checkpoint, never a mix.
Nothing is unpickled: weights come from safetensors and the training state is read
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from ..atomic import make_dirs, publish_dir, temp_dir
from ..config import ModelConfig, UserError, first_line
from ..model.transformer import Transformer
from .data import load_tokenizer

CHECKPOINT = "checkpoint"
FILES = ("config.json", "model.safetensors", "tokenizer.model")
# Marks a continual run's checkpoint (Hugging Face layout), whose tokenizer is the
# pretrained model's (tokenizer.json or tokenizer.model, checked as the shim loads it).
SOURCE = "source.json"
CONTINUAL_FILES = ("config.json", "model.safetensors", SOURCE)


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete or does not match what was asked."""


def read_json(path: Path | str) -> Any:
    """A JSON file tinyskip or Hugging Face wrote; unreadable content is one clear error."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})")
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is corrupted: not JSON ({e})")


def run_folder(checkpoint_root: Path | str, run: str) -> Path:
    """``<checkpoint_root>/<run>``; a run name that would leave checkpoint_root is refused,
    since a run folder is written to and cleaned (metrics.jsonl, temporary folders)."""
    parts = Path(run).parts
    if not parts or Path(run).is_absolute() or ".." in parts:
        raise CheckpointError(f"run={run!r}: a run name must be a relative path inside "
                              f"checkpoint_root={str(checkpoint_root)!r} (no '..', not absolute)")
    return Path(checkpoint_root) / run


def load_run_job(run_dir: Path) -> Optional[dict]:
    """The composed training config a run folder keeps in job.json (None if it has none)."""
    path = run_dir / "job.json"
    if not path.is_file():
        return None
    job = read_json(path)
    if not isinstance(job, dict):
        raise CheckpointError(f"{path} is corrupted: not a JSON object")
    return job


def save_run_folder(run_dir: Path, name: str, fill: Callable[[Path], None]) -> Path:
    """Replace ``<run>/<name>/`` by a folder ``fill`` writes, atomically.

    Swap: final -> old, tmp -> final, then drop old. A crash between the renames leaves
    ``.<name>-old`` complete, and loaders fall back to it; so it is dropped only once the
    new folder is durable (publish_dir fsyncs it and the run folder).
    """
    make_dirs(run_dir)
    final, old = run_dir / name, run_dir / f".{name}-old"
    for stale in run_dir.glob(f".{name}-tmp-*"):     # left by a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = temp_dir(run_dir, f".{name}-tmp-")
    fill(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
    publish_dir(tmp, final, backup=old)
    shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(run_dir: Path, model: Transformer, tokenizer_file: Path,
                    train_state: Optional[dict] = None,
                    also: Optional[Callable[[Path], None]] = None) -> Path:
    """``also(folder)``: more files for the new folder before it is published (a sharded
    run's shards, sharded_checkpoint.py)."""
    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(model.config.to_dict(), indent=1))
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)     # tied: stored once, as embed_tokens.weight
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        shutil.copyfile(tokenizer_file, tmp / "tokenizer.model")
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
        if also is not None:
            also(tmp)

    return save_run_folder(run_dir, CHECKPOINT, fill)


def resolve_checkpoint(path: Path | str) -> Path:
    """A checkpoint folder, given it or the run folder that holds it."""
    path = Path(path)
    for candidate in (path, path / CHECKPOINT, path / f".{CHECKPOINT}-old"):
        if (candidate / "config.json").is_file():
            needed = CONTINUAL_FILES if (candidate / SOURCE).is_file() else FILES
            missing = [f for f in needed if not (candidate / f).is_file()]
            if missing:
                raise CheckpointError(f"checkpoint {candidate} is incomplete: missing {missing}")
            return candidate
    raise CheckpointError(f"no checkpoint at {path} (expected {path}/{CHECKPOINT}/config.json; "
                          "train one with python -m tinyskip.train run=<name>)")


def file_hash(*paths: Path) -> str:
    """sha256 over the bytes of files, in order, read in 1 MiB blocks."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def weights_hash(ckpt: Path) -> str:
    """sha256 of a checkpoint's weights file: what results made with it are keyed by."""
    return file_hash(ckpt / "model.safetensors")


def load_model_config(ckpt: Path) -> ModelConfig:
    fields = read_json(ckpt / "config.json")
    try:
        return ModelConfig.from_dict(fields)
    except (TypeError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: config.json is corrupted ({e})")


def check_tokenizer(ckpt: Path, cfg: ModelConfig) -> None:
    """The checkpoint's tokenizer must be readable and produce only ids the model embeds."""
    size = load_tokenizer(ckpt / "tokenizer.model").get_piece_size()
    if size > cfg.vocab_size:
        raise CheckpointError(f"checkpoint {ckpt}: tokenizer.model has {size} tokens, more than "
                              f"the model's vocab_size={cfg.vocab_size}")


def load_model(path: Path | str, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[Transformer, Path]:
    """Rebuild the model from a checkpoint's own config and load its weights."""
    ckpt = resolve_checkpoint(path)
    cfg = load_model_config(ckpt)
    check_tokenizer(ckpt, cfg)
    try:
        state = load_file(str(ckpt / "model.safetensors"), device=str(device))
    except Exception as e:  # safetensors raises its own error types on corrupt files
        raise CheckpointError(f"checkpoint {ckpt}: model.safetensors is unreadable ({e})")
    with torch.device("meta"):
        expected = set(Transformer(cfg).state_dict())
    expected -= {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    if set(state) != expected:
        diff = sorted(set(state) ^ expected)[:4]
        raise CheckpointError(f"checkpoint {ckpt}: weights do not match its config.json "
                              f"(differing tensors: {diff})")
    try:
        model = build_model(cfg, state, device)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {ckpt}: weights do not match its config.json "
                              f"({str(e).splitlines()[-1].strip()})")
    return model.to(dtype).eval(), ckpt


def build_model(cfg: ModelConfig, state: dict, device: str | torch.device = "cpu") -> Transformer:
    """A model of config ``cfg`` that takes the tensors of ``state`` as its weights (no
    copy; tied embeddings need no lm_head.weight), its RoPE tables on ``device``."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.reset_rope(device)
    return model


def load_train_state(ckpt: Path, sharded: bool = False) -> dict:
    """step and optimizer state; a ``sharded`` checkpoint keeps its optimizer state in
    its shards (sharded_checkpoint.py) instead."""
    path = ckpt / "train_state.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} has no train_state.pt: it cannot be resumed")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types on a torn or foreign file
        raise CheckpointError(f"checkpoint {ckpt}: train_state.pt is corrupted ({first_line(e)})")
    needed = ("step",) if sharded else ("step", "optimizer")
    if not isinstance(state, dict) or not set(needed) <= set(state):
        raise CheckpointError(f"checkpoint {ckpt}: train_state.pt is corrupted (no "
                              f"{' and '.join(needed)} state)")
    return state
