"""Load what a decoding entry point runs: a tinyskip checkpoint or a Hugging Face Llama.

``run=NAME`` / ``checkpoint=PATH`` load a tinyskip checkpoint folder;
``model=hf_llama model.path=<folder or Hub id>`` loads Hugging Face Llama weights into
the same model class. Both come with a tokenizer exposing encode / decode / stop_ids.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from ..config import DEFAULT_RUN, DataConfig, ModelConfig, UserError
from ..model.exit_classifier import FILE as CLASSIFIER_FILE, ExitClassifier, load_exit_classifier
from ..model.exits import frequent_tokens
from ..model.quantize import quantize_int8
from ..model.transformer import Transformer
from ..runtime import DTYPES, check_runs
from .checkpoint import load_model, load_run_job, resolve_checkpoint, run_folder
from .continual_checkpoint import read_source
from .data import SPLITS, encode_text, load_lines, load_tokenizer, prepare_corpus
from .exit_checkpoint import (backbone_hash, exit_modules_hash, exits_folder, load_exit_modules,
                              read_exit_meta)
from .hf_llama import HFTokenizer, load_hf_llama


def checkpoint_path(run: Optional[str], checkpoint: Optional[str], checkpoint_root: str) -> Path:
    """The checkpoint folder a job names (``checkpoint=``, else ``run=``, else the default run)."""
    return resolve_checkpoint(checkpoint or run_folder(checkpoint_root, run or DEFAULT_RUN))


def run_data_config(run_dir: Optional[Path], given: DataConfig) -> DataConfig:
    """The data a run was trained on (its job.json), overridden by every field the user set.

    A field still at its default is taken from the run, so ``infer`` and ``calibrate``
    find the offline copy training used without being told again.
    """
    saved = load_run_job(run_dir) if run_dir is not None else None
    if saved is None:
        return given
    trained = saved.get("data", {})
    default = DataConfig()
    fields = {f.name: getattr(given, f.name) for f in dataclasses.fields(DataConfig)}
    for name, value in fields.items():
        if value == getattr(default, name) and name in trained:
            fields[name] = trained[name]
    return DataConfig(**fields)


def split_ids(lines: dict[str, list[str]], tokenizer, splits) -> dict[str, np.ndarray]:
    """Each split's text as one token sequence through the model's own tokenizer: its
    non-blank lines (``load_lines``) stripped, joined by spaces and encoded at once (what
    the benchmark's prompts come from, and how a Hugging Face model reads the corpus:
    ``corpus_of``)."""
    return {s: np.asarray(tokenizer.encode(" ".join(line.strip() for line in lines[s]
                                                    if line.strip())), dtype=np.int64)
            for s in splits}


@dataclass
class TokenStreams:
    """A corpus as a model reads it: every split's tokens, its words (for word-level
    perplexity), and the tokens that end a generation."""

    tokens: dict[str, np.ndarray]
    words: dict[str, int]
    stop: Union[int, frozenset[int]]      # one EOS id, or a set of stop ids


def corpus_of(loaded: "Loaded", data: DataConfig) -> TokenStreams:
    """A tinyskip run reads its own training stream (``prepare_corpus``: a line break is
    EOS, cached); a Hugging Face model reads each split's text through its own tokenizer
    (``split_ids``), whatever tokenizer files its folder holds, and stops at its own stop
    tokens (a list for Llama 3 instruct models)."""
    if loaded.fmt == "hf":
        lines = load_lines(data)[0]
        return TokenStreams(split_ids(lines, loaded.tokenizer, SPLITS),
                            {s: sum(len(line.split()) for line in lines[s]) for s in SPLITS},
                            loaded.tokenizer.stop_ids())
    corpus = prepare_corpus(data, loaded.tokenizer_file)
    return TokenStreams(corpus.tokens, corpus.words, corpus.eos_id)


def trained_seq_len(loaded: "Loaded") -> int:
    """The window a run trained on (its job.json), else the model's context: a tinyskip
    model has not learnt positions past its training windows, so scoring longer ones
    measures extrapolation, not the model."""
    saved = load_run_job(loaded.run_dir) if loaded.run_dir is not None else None
    ctx = loaded.model.config.max_position_embeddings
    return (saved or {}).get("train", {}).get("seq_len", ctx)


class SentencePieceTokenizer:
    """A tinyskip checkpoint's tokenizer (trained without BOS).

    Text is encoded the way the training data was (``data.encode_text``: a line break is
    the EOS the model predicts at each line's end). No special token is added around it.
    """

    bos_id = None                     # nothing goes before a text: no BOS in training

    def __init__(self, path: Path):
        self.path = path
        self.sp = load_tokenizer(path)

    def encode(self, text: str, special: bool = True) -> list[int]:
        return encode_text(self.sp.encode, self.sp.eos_id(), text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i != self.sp.eos_id()])

    def stop_ids(self) -> frozenset[int]:
        return frozenset([self.sp.eos_id()])


@dataclass
class Loaded:
    model: Transformer
    tokenizer: object                 # encode(str) -> ids, decode(ids) -> str, stop_ids()
    source: str                       # the folder the (backbone) weights came from
    tokenizer_file: Optional[Path]    # a SentencePiece file the data pipeline can use
    run_dir: Optional[Path] = None    # where this model's results go (calibration, classifier)
    exits: Optional[Path] = None      # the exit-module folder attached, if any
    _backbone_digest: Optional[str] = None
    fmt: str = "tinyskip"             # the backbone's format: "tinyskip" or "hf" (a folder)
    quantize: str = "none"            # "int8": weight-only int8 since loading (model/quantize.py)

    def backbone_hash(self) -> str:
        """The backbone weights' hash (computed once, on demand: an 8B model is 16 GB)."""
        if self._backbone_digest is None:
            self._backbone_digest = backbone_hash(Path(self.source))
        return self._backbone_digest

    def weights_hash(self) -> str:
        """What results made with this model are keyed by: the backbone's hash, combined
        with the exit modules' when they are attached, and with the quantisation when
        there is one (a calibration made on fp32 weights does not certify int8 ones)."""
        return results_hash(self.backbone_hash(), self.exits, self.quantize)


def results_hash(backbone_digest: str, exits: Optional[Path], quantize: str = "none") -> str:
    """``Loaded.weights_hash`` from its parts (an export re-keys a calibration with it)."""
    digest = backbone_digest
    if exits is not None:
        digest = hashlib.sha256((digest + exit_modules_hash(exits)).encode()).hexdigest()
    if quantize != "none":
        digest = hashlib.sha256((digest + quantize).encode()).hexdigest()
    return digest


def load_backbone(path: str, fmt: str, device: torch.device, dtype: str = "float32") -> Loaded:
    """A tinyskip checkpoint (``fmt="tinyskip"``) or a Hugging Face Llama folder or Hub id
    (``fmt="hf"``), bare. A continual run's checkpoint is named as any run's but is a
    Hugging Face folder (checkpoint.py): it loads through the shim, as the pretrained
    model it started from did (its tokenizer, its token stream: ``corpus_of``), with its
    run folder for its job.json and results."""
    run_dir = None
    if fmt == "tinyskip":
        ckpt = resolve_checkpoint(path)
        if read_source(ckpt) is not None:
            path, fmt, run_dir = str(ckpt), "hf", ckpt.parent
    if fmt == "hf":
        model, folder = load_hf_llama(path, device, DTYPES[dtype])
        sp = folder / "tokenizer.model"
        return Loaded(model, HFTokenizer(folder, model.config), str(folder),
                      sp if sp.is_file() else None, run_dir, fmt="hf")
    model, ckpt = load_model(path, device, DTYPES[dtype])
    tok = ckpt / "tokenizer.model"
    return Loaded(model, SentencePieceTokenizer(tok), str(ckpt), tok, ckpt.parent)


def load_source(run: Optional[str], checkpoint: Optional[str], checkpoint_root: str,
                model_cfg: Optional[ModelConfig], device: torch.device,
                dtype: str = "float32", quantize: str = "none") -> Loaded:
    """What a job names: a Hugging Face Llama (``model.path``), a tinyskip run, or an
    exit-module run (its backbone, hash-checked, with the modules attached); with
    ``quantize="int8"``, the backbone's weights then made int8 (model/quantize.py)."""
    check_runs(device, DTYPES[dtype], dtype)
    if model_cfg is not None and model_cfg.path:
        loaded = load_backbone(model_cfg.path, "hf", device, dtype)
        # An export of an exit-module run carries its modules in <folder>/exits/.
        exits = exits_folder(Path(loaded.source))
        if exits is not None:
            attach_exits(loaded, exits)
    else:
        folder = Path(checkpoint) if checkpoint else run_folder(checkpoint_root, run or DEFAULT_RUN)
        exits = exits_folder(folder)
        if exits is None:
            loaded = load_backbone(str(resolve_checkpoint(folder)), "tinyskip", device, dtype)
        else:
            backbone = read_exit_meta(exits)["backbone"]
            # A relative path is relative to the exits folder (an export records "..":
            # the folder travels, and is downloaded, as a whole); training records an
            # absolute one, which the join leaves as it is.
            loaded = load_backbone(str(exits / backbone["path"]), backbone["format"], device,
                                   dtype)
            attach_exits(loaded, exits)
            loaded.run_dir = exits.parent
    if quantize == "int8":
        quantize_int8(loaded.model)
        loaded.quantize = quantize
    return loaded


def attach_exits(loaded: Loaded, exits: Path) -> None:
    """The modules of an ``exits/`` folder, hash-checked against the loaded backbone."""
    modules = load_exit_modules(exits, loaded.model, loaded.backbone_hash())
    loaded.model.attach_exit_modules(modules)
    loaded.exits = exits


def draft_vocabulary(loaded: Loaded, spec, data) -> Optional[torch.Tensor]:
    """The N most frequent tokens of the train split as the model reads it (``corpus_of``),
    for ``draft_vocab=N`` (None when off)."""
    if spec.ssd is None or not spec.ssd.draft_vocab:
        return None
    train_tokens = corpus_of(loaded, run_data_config(loaded.run_dir, data)).tokens["train"]
    return frequent_tokens(train_tokens, loaded.model.config.vocab_size, spec.ssd.draft_vocab)


def exit_classifier_for(loaded: Loaded, spec) -> Optional[ExitClassifier]:
    """The run's exit classifier when the mode is DEE with ``measure=classifier``."""
    if spec.dee is None or spec.dee.measure != "classifier":
        return None
    folder = loaded.run_dir or Path(loaded.source)
    return load_exit_classifier(folder / CLASSIFIER_FILE, loaded.weights_hash())


def default_calibration(loaded: Loaded) -> Path:
    """Where ``calibrate`` writes and ``infer mode=dee`` looks without ``calibration=``:
    ``<run>/calibration.json``, or ``calibration-int8.json`` for int8 weights, so that
    calibrating one never overwrites the other's."""
    q = loaded.quantize
    name = "calibration.json" if q == "none" else f"calibration-{q}.json"
    return (loaded.run_dir or Path(loaded.source)) / name


def read_calibration(path: Path, loaded: Loaded) -> dict:
    """A calibration file, refused when it was made for other weights."""
    try:
        cal = json.loads(path.read_text(encoding="utf-8"))
        measure, exits, lam, whash, cache, length = (
            cal["measure"], cal["exits"], cal["threshold"], cal["weights_hash"], cal["cache"],
            cal["max_new_tokens"])
        if not (isinstance(measure, str) and isinstance(whash, str) and isinstance(cache, str)
                and isinstance(exits, list) and all(isinstance(e, int) for e in exits)
                and (lam is None or isinstance(lam, (int, float))) and isinstance(length, int)):
            raise TypeError("a field has the wrong type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"calibration={str(path)!r} is not a calibration file ({e})")
    if loaded.weights_hash() != whash:
        quantized = "" if loaded.quantize == "none" else f" quantize={loaded.quantize}"
        raise UserError(f"calibration={str(path)!r} was made for other weights (hash "
                        f"{whash[:12]}...) than {loaded.source}{quantized}: run python -m "
                        f"tinyskip.calibrate{quantized}")
    return {"measure": measure, "exits": exits, "cache": cache,
            "threshold": [math.inf if lam is None else lam], "max_new_tokens": length}


def check_calibrated_length(path: Path, cal: dict, max_new_tokens: int) -> None:
    """The guarantee covers generations as long as the calibration's, no longer."""
    if max_new_tokens > cal["max_new_tokens"]:
        raise UserError(f"max_new_tokens={max_new_tokens}: calibration={str(path)!r} certifies "
                        f"generations of up to {cal['max_new_tokens']} new tokens (calibrate "
                        f"again with max_new_tokens={max_new_tokens}, or give threshold= for "
                        "no guarantee)")
