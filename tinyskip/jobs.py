"""Primary config schemas, one per entry point (``conf/<entry>.yaml`` is typed by these)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .config import ConfigError, DataConfig, ModelConfig, TrainConfig
from .modes import MODES


def check_source(job) -> None:
    """A job loads a checkpoint (run= / checkpoint=) or, where it has a ``model`` field,
    a Hugging Face model (model=hf_llama model.path=...)."""
    hf_ok = hasattr(job, "model")
    hf = hf_ok and job.model is not None and job.model.path
    if hf and (job.run or job.checkpoint):
        raise ConfigError("give either run=/checkpoint= or model=hf_llama model.path=..., not both")
    if not hf and job.run is None and job.checkpoint is None:
        raise ConfigError("give run=<name> (a folder under checkpoint_root) or checkpoint=<path>"
                          + (", or model=hf_llama model.path=<folder or Hub id>" if hf_ok else ""))


def check_dtype(job) -> None:
    if job.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype={job.dtype!r}: must be one of float32, bfloat16, float16")


@dataclass
class CheckpointSource:
    """Where a job finds its checkpoint: ``run=NAME`` under ``checkpoint_root``, or a path."""

    run: Optional[str] = None
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

    @property
    def run_name(self) -> str:
        return self.run or self.model.name


@dataclass
class EvaluateJob(CheckpointSource):
    """``python -m tinyskip.evaluate run=NAME split=test [out=FILE.json]``."""

    split: str = "test"
    out: Optional[str] = None
    seq_len: Optional[int] = None             # None: the run's training seq_len
    batch_size: int = 16
    max_batches: int = 0                      # 0 = the whole split
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        if self.split not in ("train", "validation", "test"):
            raise ConfigError(f"split={self.split!r}: must be one of train, validation, test")
        check_source(self)


@dataclass
class InferJob(CheckpointSource):
    """``python -m tinyskip.infer mode=full|static|ssd run=NAME prompt="..."``."""

    mode: str = "full"
    prompt: Optional[str] = None
    prompts_file: Optional[str] = None        # one prompt per line
    max_new_tokens: int = 64
    temperature: float = 0.0                  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    exit_layer: Optional[int] = None          # mode=static: blocks to run (1..L)
    draft_layer: Optional[int] = None         # mode=ssd: E, blocks the draft runs (1..L)
    k: int = 4                                # mode=ssd: drafts per round
    adaptive_threshold: float = 0.0           # mode=ssd: stop drafting below this confidence
    draft_vocab: int = 0                      # mode=ssd: N most frequent tokens (needs data)
    stop_at_eos: bool = True
    out: Optional[str] = None                 # JSON with ids, text and statistics per prompt
    device: str = "auto"
    dtype: str = "float32"
    model: Optional[ModelConfig] = None       # model=hf_llama model.path=...
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r}: must be one of {', '.join(MODES)}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.mode == "static" and self.exit_layer is None:
            raise ConfigError("mode=static needs exit_layer=<1..L>")
        if self.mode == "ssd" and self.draft_layer is None:
            raise ConfigError("mode=ssd needs draft_layer=<1..L> (and k=<drafts per round>)")
        if (self.prompt is None) == (self.prompts_file is None):
            raise ConfigError('give exactly one of prompt="..." or prompts_file=<file>')
        check_source(self)
        check_dtype(self)


@dataclass
class BenchJob(CheckpointSource):
    """``python -m tinyskip.bench run=NAME``: decoding modes side by side (see bench.py)."""

    n_prompts: int = 8
    prompt_len: int = 64
    max_new_tokens: int = 64
    static_layers: list[int] = field(default_factory=lambda: [3])
    ssd_layers: list[int] = field(default_factory=lambda: [2, 3, 4])
    ssd_k: list[int] = field(default_factory=lambda: [2, 4, 6])
    draft_vocab: int = 0                      # > 0: also every ssd row with this draft vocab
    adaptive_threshold: float = 0.0           # > 0: also every ssd row with adaptive drafting
    threads: int = 0                          # 0 = torch's default
    device: str = "auto"
    dtype: str = "float32"
    out: Optional[str] = None
    model: Optional[ModelConfig] = None       # model=hf_llama model.path=...
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        check_source(self)
        check_dtype(self)
        for name in ("n_prompts", "prompt_len", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 1")


@dataclass
class ExportJob(CheckpointSource):
    """``python -m tinyskip.export run=NAME out=FOLDER``: a Hugging Face Llama folder."""

    out: str = "???"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        check_source(self)
        check_dtype(self)


SCHEMAS: dict[str, type] = {"export": ExportJob, "train": TrainJob, "evaluate": EvaluateJob, "infer": InferJob,
                            "bench": BenchJob}
