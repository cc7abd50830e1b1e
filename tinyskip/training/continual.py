"""Continual training of a pretrained Llama: ``model=hf_llama model.path=FOLDER_OR_GGUF``
with any preset but balcony (issue 27: LayerSkip's own recipe, where every weight trains).

The trainer's loop runs it as it runs a model from scratch (LayerDrop, early-exit losses,
evaluation, metrics, resume); only the start and the checkpoint differ:

- the model is the pretrained one, loaded through the Llama shim (a GGUF file is
  converted first: gguf.py) in fp32, the master weights under the preset's autocast;
- the data is each split read through the model's own tokenizer (``corpus_of``, the
  stream exit modules train on), not a SentencePiece tokenizer trained on the data;
- the checkpoint is a Hugging Face folder holding the pretrained tokenizer files and
  ``source.json`` (checkpoint.py), so ``run=NAME`` loads it through the shim in every
  entry point, with that tokenizer's BOS and EOS rules and that token stream.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch

from ..config import ConfigError, ModelConfig
from ..jobs import TrainJob
from ..model.transformer import Transformer
from ..storage.checkpoint import CheckpointError, load_train_state
from ..storage.continual_checkpoint import carried_files, read_source, save_continual_checkpoint
from ..storage.exit_checkpoint import backbone_hash
from ..storage.hf_llama import resolve_folder
from ..storage.loading import TokenStreams, corpus_of, load_backbone
from .resume import check_fresh, check_recipe

# ModelConfig fields a continual run may be given: the rest is the pretrained model's.
FREE = {"name", "path"}


def check_origin(job: TrainJob, ckpt: Path, run_dir: Path) -> None:
    """A resumed run continues what it started from: a pretrained model (model.path) or
    nothing (from scratch)."""
    source = read_source(ckpt)
    if job.model.path and source is None:
        raise CheckpointError(f"train.resume=true with model.path={job.model.path!r}: {run_dir} "
                              "was trained from scratch (resume it without model.path, or "
                              "start a new run=<name>)")
    if not job.model.path and source is not None:
        raise CheckpointError(f"train.resume=true: {run_dir} continues the pretrained model "
                              f"{source['path']}: resume it with model=hf_llama "
                              "model.path=<that model>")


def _check_model_settings(cfg: ModelConfig) -> None:
    default = ModelConfig()
    for f in dataclasses.fields(ModelConfig):
        value = getattr(cfg, f.name)
        if f.name not in FREE and value != getattr(default, f.name):
            raise ConfigError(f"model.{f.name}={value!r}: a continual run's model is model.path"
                              f"={cfg.path!r} as its config.json describes it; give "
                              "model=hf_llama model.path=... without other model.* settings")


def prepare_continual(job: TrainJob, run_dir: Path, ckpt: Path | None, sharded: bool
                      ) -> tuple[TrainJob, Transformer, TokenStreams, dict | None, Callable]:
    """What ``trainer.train`` starts from (as ``trainer._prepare_run``): the job as it
    runs (the pretrained model's config), the model (pretrained, or resumed from
    ``ckpt``), its token streams, the optimizer state (None: fresh) and
    ``save(model, train_state, also=None)``."""
    tc = job.train
    _check_model_settings(job.model)
    if ckpt is not None:
        saved = read_source(ckpt)
        digest = backbone_hash(resolve_folder(job.model.path))
        if saved["weights_hash"] != digest:
            raise CheckpointError(
                f"train.resume=true with other weights than {run_dir} started from: "
                f"model.path={job.model.path!r} has weight hash {digest[:12]}..., the run's "
                f"{saved['path']} {saved['weights_hash'][:12]}...")
        check_recipe(job, run_dir)
        state = load_train_state(ckpt, sharded)
        loaded = load_backbone(str(ckpt), "hf", torch.device("cpu"))   # the weights reached
    else:
        check_fresh(run_dir, tc)
        state = None
        loaded = load_backbone(job.model.path, "hf", torch.device("cpu"))
        digest = loaded.backbone_hash()
    model = loaded.model
    ctx = model.config.max_position_embeddings
    if tc.seq_len > ctx:
        raise ConfigError(f"train.seq_len={tc.seq_len}: longer than the model's context "
                          f"(max_position_embeddings={ctx})")
    corpus = corpus_of(loaded, job.data)
    # What the run records of its start: the path as given (absolute when local) and the
    # weights' hash, which a resume must match. The checkpoint resumed from holds the
    # same tokenizer files as the pretrained folder.
    local = Path(job.model.path).expanduser()
    source = {"path": str(local.resolve()) if local.exists() else job.model.path,
              "weights_hash": digest}
    carried = carried_files(Path(loaded.source), source)

    def save(model: Transformer, train_state: dict, also=None) -> None:
        save_continual_checkpoint(run_dir, model, carried, train_state, also)

    job = dataclasses.replace(job, model=dataclasses.replace(model.config, path=job.model.path))
    return job, model, corpus, state, save
