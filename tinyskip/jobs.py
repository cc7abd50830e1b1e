"""Primary config schemas of the entry points (``conf/<entry>.yaml`` is typed by these; the
benchmarks' are in ``bench_jobs.py``)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .config import (ConfigError, DataConfig, DEEConfig, ModelConfig, SamplingConfig, SSDConfig,
                     TrainConfig, check_mode, check_seed)
from .runtime import DTYPES, QUANTIZE


def check_source(job) -> None:
    """A job loads a checkpoint (run= / checkpoint=, default run=l6_d128) or, where it has
    a ``model`` field, a Hugging Face model (model=hf_llama model.path=...)."""
    hf = getattr(job, "model", None) is not None and job.model.path
    if hf and (job.run or job.checkpoint):
        raise ConfigError("give either run=/checkpoint= or model=hf_llama model.path=..., not both")


def check_dtype(job) -> None:
    """``dtype=`` and ``quantize=``, on the jobs that have them."""
    dtype = getattr(job, "dtype", "float32")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}: must be one of {', '.join(DTYPES)}")
    quantize = getattr(job, "quantize", "none")
    if quantize not in QUANTIZE:
        raise ConfigError(f"quantize={quantize!r}: must be one of {', '.join(QUANTIZE)}")


def check_out(job) -> None:
    """A result file must have somewhere to go: checked before hours of work, not after."""
    if job.out is None:
        return
    out = Path(job.out)
    if out.is_dir():
        raise ConfigError(f"out={job.out!r} is a folder: give a file name")
    if not out.resolve().parent.is_dir():
        raise ConfigError(f"out={job.out!r}: folder {out.resolve().parent} does not exist")


@dataclass
class CheckpointSource:
    """Where a job finds its checkpoint: ``run=NAME`` under ``checkpoint_root``, or a path."""

    run: Optional[str] = None                 # None: DEFAULT_RUN
    checkpoint: Optional[str] = None          # an explicit checkpoint or run folder
    checkpoint_root: str = "checkpoints"


@dataclass
class TrainJob:
    """``python -m tinyskip.train``: the run writes to ``<checkpoint_root>/<run>/``."""

    run: Optional[str] = None
    checkpoint_root: str = "checkpoints"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        ctx = self.model.max_position_embeddings
        # (balcony and a continual run (model.path) train a model they load: checked
        # against that model's context)
        if self.train.preset != "balcony" and not self.model.path and self.train.seq_len > ctx:
            raise ConfigError(f"train.seq_len={self.train.seq_len}: longer than the model's "
                              f"context, model.max_position_embeddings={ctx}")

    @property
    def run_name(self) -> str:
        if self.run:
            return self.run
        if self.train.preset == "balcony":   # never the backbone's own run folder
            backbone = self.train.backbone or self.model.path or "backbone"
            return f"{Path(backbone).name}-{self.train.exit_kind}-exits"
        return self.model.name


@dataclass
class EvaluateJob(CheckpointSource):
    """``python -m tinyskip.evaluate run=NAME split=test [out=FILE.json]``, or
    ``model=hf_llama model.path=...`` for a Hugging Face Llama or GGUF file."""

    split: str = "test"
    out: Optional[str] = None
    seq_len: Optional[int] = None             # None: the run's training seq_len
    stride: Optional[int] = None              # sliding windows: context >= seq_len - stride
    batch_size: int = 16
    max_batches: int = 0                      # 0 = the whole split
    device: str = "auto"
    model: Optional[ModelConfig] = None       # model=hf_llama model.path=...
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        if self.split not in ("train", "validation", "test"):
            raise ConfigError(f"split={self.split!r}: must be one of train, validation, test")
        if self.seq_len is not None and self.seq_len < 1:
            raise ConfigError(f"seq_len={self.seq_len}: must be >= 1 (or null = the run's "
                              "training seq_len)")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size}: must be >= 1")
        if self.stride is not None and not 1 <= self.stride <= (self.seq_len or self.stride):
            raise ConfigError(f"stride={self.stride}: must be in 1..seq_len={self.seq_len} (or "
                              "null = no overlap)")
        if self.max_batches < 0:
            raise ConfigError(f"max_batches={self.max_batches}: must be >= 0 (0 = the whole split)")
        check_source(self)
        check_out(self)


def dee_threshold(value: Any) -> list[float]:
    """``threshold=0.9`` or ``threshold=[0.9,0.8]`` (one per checked exit) as a list."""
    if value is None:
        return []
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise ConfigError(f"threshold={value!r}: must be a number or a list of numbers")


@dataclass
class InferJob(CheckpointSource):
    """``python -m tinyskip.infer mode=full|static|ssd|dee [run=NAME] [prompt="..."]``.

    Without prompt= or prompts_file=, prompts are read from standard input, one per line.
    """

    mode: str = "full"
    prompt: Optional[str] = None
    prompts_file: Optional[str] = None        # one prompt per line
    max_new_tokens: Optional[int] = None      # None: 64, or what the calibration file covers
    temperature: float = 0.0                  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    exit_layer: Optional[int] = None          # mode=static: exit (blocks to run, 1..L)
    draft_layer: Optional[int] = None         # mode=ssd: E, the draft's exit (1..L)
    k: int = 4                                # mode=ssd: drafts per round
    adaptive_threshold: float = 0.0           # mode=ssd: stop drafting below this confidence
    draft_vocab: int = 0                      # mode=ssd: N most frequent tokens (needs data)
    ngram: int = 0                            # mode=ssd: > 0, prompt-lookup drafts on repeats
    ngram_k: int = 0                          # mode=ssd: drafts a lookup round proposes (0 = k)
    choose: str = "fixed"                     # mode=ssd: del = exit and drafts chosen per round
    ssd_exits: list[int] = field(default_factory=list)  # mode=ssd choose=del: candidate exits
                                              # ([] = the exits with modules)
    measure: Optional[str] = None             # mode=dee: confidence measure (default: softmax,
                                              # or the calibration file's)
    threshold: Any = None                     # mode=dee: a value or one per checked exit
    calibration: Optional[str] = None         # mode=dee: a calibration file (default: the
                                              # run's calibration.json when no threshold)
    exits: list[int] = field(default_factory=list)   # mode=dee: checked exits ([] = all)
    check_every: int = 1                      # mode=dee: check every n-th exit
    cache: Optional[str] = None               # mode=dee: propagate (default) | recompute | copy
    decay_tau: float = 0.0                    # mode=dee: CALM's decaying threshold (0 = off)
    stop_at_eos: bool = True
    batch_size: int = 1                       # prompts decoded together (full/static/ssd; rows
                                              # of their own lengths, decode/ssd_batch.py)
    compile: bool = False                     # torch.compile the per-token steps (full/static/ssd)
    out: Optional[str] = None                 # JSON with ids, text and statistics per prompt
    device: str = "auto"
    dtype: str = "float32"
    quantize: str = "none"                    # int8: weight-only int8 (model/quantize.py)
    model: Optional[ModelConfig] = None       # model=hf_llama model.path=...
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        check_mode(self.mode)
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        self.sampling()                       # each option checked where it is owned
        check_seed("seed", self.seed)
        if self.mode == "static" and self.exit_layer is None:
            raise ConfigError("mode=static needs exit_layer=<1..L>")
        if self.mode == "ssd" and self.draft_layer is None and self.choose != "del":
            raise ConfigError("mode=ssd needs draft_layer=<1..L> (and k=<drafts per round>), "
                              "or choose=del")
        if self.prompt is not None and self.prompts_file is not None:
            raise ConfigError('give prompt="..." or prompts_file=<file>, not both')
        self.threshold = dee_threshold(self.threshold)
        self._check_batch()
        # Every mode's options are checked whatever the mode: a bad value is refused even
        # where this mode would ignore it.
        self.ssd()
        self.dee()
        if self.calibrated:
            self._check_calibrated()
        check_source(self)
        check_dtype(self)
        check_out(self)

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p)

    def _check_batch(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size}: must be >= 1")
        if self.batch_size > 1 and self.mode == "dee":
            raise ConfigError(f"batch_size={self.batch_size}: mode=dee decodes one prompt at a "
                              "time (give batch_size=1)")
        if self.batch_size > 1 and self.mode == "ssd" and self.ngram:
            raise ConfigError(f"batch_size={self.batch_size}: ngram={self.ngram} (prompt-lookup "
                              "drafts) decodes one prompt at a time (give batch_size=1 or ngram=0)")
        if self.batch_size > 1 and self.mode == "ssd" and self.choose == "del":
            raise ConfigError(f"batch_size={self.batch_size}: choose=del (an exit chosen per "
                              "round) decodes one prompt at a time (give batch_size=1 or "
                              "choose=fixed)")

    def ssd(self) -> SSDConfig:
        """``mode=ssd``'s decoder (its exit checked against the model when loaded)."""
        return SSDConfig(self.draft_layer, self.k, self.adaptive_threshold, self.draft_vocab,
                         self.ngram, self.choose, list(self.ssd_exits), self.ngram_k)

    def dee(self) -> DEEConfig:
        """``mode=dee``'s decoder as the options give it (``calibrated``: the threshold,
        and with it the measure, exits and cache, come from a calibration file instead)."""
        return DEEConfig(self.measure or "softmax", list(self.threshold), list(self.exits),
                         self.check_every, self.cache or "propagate", self.decay_tau)

    @property
    def calibrated(self) -> bool:
        """``mode=dee`` under a calibration file: ``calibration=`` or no ``threshold=``."""
        return self.mode == "dee" and (bool(self.calibration) or not self.threshold)

    def _check_calibrated(self) -> None:
        """A calibration certifies one decoder (README, "A calibration certifies one
        decoder"): what changes it is refused here, what the file holds is checked
        against it when it is read (``decode/run.py``)."""
        if self.calibration and self.threshold:
            raise ConfigError("give threshold=... or calibration=..., not both")
        if self.exits or self.decay_tau or self.check_every != 1:
            raise ConfigError("exits=, check_every= and decay_tau= change the decoder the "
                              "calibration file certifies: give threshold= to use them")
        if not self.sampling().greedy:
            raise ConfigError(f"temperature={self.temperature}: a calibration file certifies "
                              "greedy decoding; sample with threshold= instead (no guarantee)")


@dataclass
class HarnessJob(InferJob):
    """``python -m tinyskip.harness [tasks=[...]] [mode=...]``: lm-evaluation-harness tasks
    through one decoding mode (``analysis/harness_lm.py``). The tasks give the prompts and
    lengths, so infer's prompt options are refused."""

    tasks: list[str] = field(default_factory=lambda: ["tinyskip_wikitext2"])
    limit: Optional[float] = None             # documents per task (< 1: a fraction of them)
    num_fewshot: Optional[int] = None         # None: each task's own
    batch_size: int = 8                       # scored windows per forward pass
    max_length: Optional[int] = None          # scoring window (None: the run's training
                                              # seq_len, else the model's context)
    gen_kwargs: Optional[str] = None          # 'max_gen_toks=32,...' (quoted): over the tasks' own
    bootstrap_iters: int = 1000               # the harness's standard errors (0 = none)

    def _check_batch(self) -> None:
        """``batch_size`` here batches scored windows, not generations (checked below)."""

    def __post_init__(self) -> None:
        for name in ("prompt", "prompts_file", "max_new_tokens"):
            if getattr(self, name) is not None:
                raise ConfigError(f"{name}={getattr(self, name)!r}: harness tasks give the "
                                  "prompts and lengths (gen_kwargs='max_gen_toks=N' caps them)")
        super().__post_init__()
        if not self.tasks:
            raise ConfigError("tasks=[]: give at least one task")
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"limit={self.limit}: must be > 0 (null = every document)")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError(f"num_fewshot={self.num_fewshot}: must be >= 0")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size}: must be >= 1")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"max_length={self.max_length}: must be >= 2 (null = the run's "
                              "training seq_len)")
        if self.bootstrap_iters < 0:
            raise ConfigError(f"bootstrap_iters={self.bootstrap_iters}: must be >= 0")
        check_gen_kwargs(self.gen_kwargs)


def check_gen_kwargs(text: Optional[str]) -> None:
    """``gen_kwargs="max_gen_toks=32,temperature=0"`` (the harness's KEY=VALUE list): the
    options the decoders read checked before a model loads; the others are the harness's."""
    for item in filter(None, (text or "").split(",")):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key:
            raise ConfigError(f"gen_kwargs: {item!r} is not KEY=VALUE")
        if key == "max_gen_toks" and not (value.isdigit() and int(value) >= 1):
            raise ConfigError(f"gen_kwargs: max_gen_toks={value!r}: must be an integer >= 1")
        if key == "do_sample" and value.lower() not in ("true", "false"):
            raise ConfigError(f"gen_kwargs: do_sample={value!r}: must be true or false")
        if key == "temperature":
            try:
                temperature = float(value)
            except ValueError:
                raise ConfigError(f"gen_kwargs: temperature={value!r}: must be a number")
            SamplingConfig(temperature)


@dataclass
class ExportJob(CheckpointSource):
    """``python -m tinyskip.export run=NAME out=FOLDER [push=OWNER/NAME]``: a Hugging Face
    Llama folder with a model card, and the run's exit modules and calibration when it has
    them (``analysis/export.py``)."""

    out: str = "???"
    dtype: str = "float32"
    # The card's licence (a Hub licence id). cc-by-sa-3.0 by default: a model tinyskip
    # trains learns from WikiText, which is CC BY-SA 3.0, and its share-alike terms are
    # the cautious reading for weights derived from it (the MIT licence of tinyskip's code
    # does not cover them). An export of another's backbone (an exit-module run on a
    # Hugging Face Llama) must name that backbone's licence instead: license=llama3.1.
    license: str = "cc-by-sa-3.0"
    evaluate: bool = True                     # per-exit test-split numbers in the card
    eval_batches: int = 0                     # 0 = the whole test split
    push: Optional[str] = None                # then upload to this Hub repo (owner/name or name)
    device: str = "auto"                      # where the card's numbers are computed
    data: DataConfig = field(default_factory=DataConfig)   # defaults: the run's job.json

    def __post_init__(self) -> None:
        check_source(self)
        check_dtype(self)
        if not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", self.license):
            raise ConfigError(f"license={self.license!r}: give a Hub licence id such as "
                              "cc-by-sa-3.0, apache-2.0, mit or other")
        if self.eval_batches < 0:
            raise ConfigError(f"eval_batches={self.eval_batches}: must be >= 0 (0 = the whole "
                              "test split; evaluate=false skips it)")
        if self.push is not None and not hub_repo_id(self.push):
            raise ConfigError(f"push={self.push!r}: not a Hub repo name (owner/name or name: "
                              "letters, digits, '-', '_', '.'; no '--' or '..')")


def hub_repo_id(text: str) -> bool:
    """The Hub's rule for a model repo id, checked before anything is written (as
    huggingface_hub's ``validate_repo_id``, which needs the optional hf extra)."""
    part = r"\w(?:[\w.-]{0,94}\w)?"          # 1 to 96 characters, starting and ending in \w
    return (re.fullmatch(rf"(?:{part}/)?{part}", text, re.ASCII) is not None
            and "--" not in text and ".." not in text and not text.endswith(".git"))


@dataclass
class CalibrateJob(CheckpointSource):
    """``python -m tinyskip.calibrate [run=NAME] [measure=softmax] [delta=0.1] [epsilon=0.05]``:
    a DEE threshold with CALM's guarantee, written to ``<run>/calibration.json``."""

    measure: str = "softmax"
    delta: float = 0.1                        # tolerance on the expected consistency loss
    epsilon: float = 0.05                     # failure probability of the guarantee
    loss: str = "f1"                          # f1 (1 - token F1 with full) | mismatch | risk
    n_examples: int = 100                     # calibration prompts from split
    split: str = "validation"                 # the test split is refused for calibration
    test_split: Optional[str] = "test"        # measure the calibrated threshold here (None = skip)
    n_test: int = 100
    prompt_len: int = 32
    max_new_tokens: int = 32
    grid: int = 50                            # thresholds: quantiles of the confidences
    exits: list[int] = field(default_factory=list)   # checked exits ([] = every check_every-th)
    check_every: int = 1
    cache: str = "propagate"
    quality: float = 0.95                     # the naive baseline: keep >= this of full quality
    accuracy: float = 0.9                     # DSSD's per-exit accuracy-level thresholds
    check_splits: int = 0                     # > 0: the guarantee's frequency over random splits
    out: Optional[str] = None                 # default <run>/calibration.json
    seed: int = 0
    quantize: str = "none"                    # int8: calibrate the int8 weights infer runs
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    model: Optional[ModelConfig] = None       # model=hf_llama model.path=...: a Hugging Face Llama

    def __post_init__(self) -> None:
        check_dtype(self)
        self.decoder()
        for name in ("delta", "epsilon"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise ConfigError(f"{name}={value}: must be in (0, 1)")
        if self.loss not in ("f1", "mismatch", "risk"):
            raise ConfigError(f"loss={self.loss!r}: must be one of f1, mismatch, risk")
        if self.split != "validation":
            raise ConfigError(f"split={self.split!r}: calibrate on the held-out validation split "
                              "(the model trained on train; test is kept for checking the guarantee)")
        if self.check_splits < 0:
            raise ConfigError(f"check_splits={self.check_splits}: must be >= 0 (0 = off)")
        if self.test_split not in (None, "test", "validation") or self.test_split == self.split:
            raise ConfigError(f"test_split={self.test_split!r}: must be test or validation, and "
                              f"not the calibration split {self.split!r}")
        for name in ("n_examples", "prompt_len", "max_new_tokens", "grid", "n_test"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 1")
        if not 0 < self.quality <= 1 or not 0 < self.accuracy <= 1:
            raise ConfigError(f"quality={self.quality}, accuracy={self.accuracy}: must be in (0, 1]")
        check_seed("seed", self.seed)
        check_source(self)
        check_out(self)

    def decoder(self) -> DEEConfig:
        """The DEE decoder being calibrated, with the threshold still open (inf)."""
        return DEEConfig(self.measure, [math.inf], list(self.exits), self.check_every, self.cache)
