"""The benchmarks' job schemas: ``python -m tinyskip.bench`` (decoding modes side by side)
and ``python -m tinyskip.train_bench`` (the training presets' steps side by side)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .config import (ConfigError, DEEConfig, DataConfig, ModelConfig, SamplingConfig, SSDConfig,
                     TrainConfig, check_seed)
from .jobs import CheckpointSource, check_dtype, check_out, check_source
from .runtime import DTYPES, QUANTIZE


def precision(text: str) -> tuple[str, str]:
    """A bench precision, ``DTYPE`` or ``DTYPE+QUANTIZE`` (``bfloat16+int8``: int8
    weights, bf16 activations) -> (dtype, quantize), refused in one line when unknown."""
    dtype, plus, quantize = str(text).partition("+")
    if dtype not in DTYPES or (plus and quantize not in QUANTIZE[1:]):
        raise ConfigError(f"precisions: {text!r} is not DTYPE or DTYPE+QUANTIZE (DTYPE one of "
                          f"{', '.join(DTYPES)}; QUANTIZE one of {', '.join(QUANTIZE[1:])})")
    return dtype, quantize or "none"


def precision_name(dtype: str, quantize: str) -> str:
    """(dtype, quantize) -> the name ``precision`` reads: ``bfloat16``, ``bfloat16+int8``."""
    return dtype if quantize == "none" else f"{dtype}+{quantize}"



@dataclass
class BenchJob(CheckpointSource):
    """``python -m tinyskip.bench run=NAME``: decoding modes side by side (see bench.py)."""

    n_prompts: int = 8
    prompt_len: int = 64
    max_new_tokens: int = 64
    exit_layer: Optional[list[int]] = None     # None: every exit 1..L-1
    draft_layer: list[int] = field(default_factory=lambda: [2, 3, 4])
    k: list[int] = field(default_factory=lambda: [2, 4, 6])
    draft_vocab: int = 0                      # > 0: also every ssd row with this draft vocab
    adaptive_threshold: float = 0.0           # > 0: also every ssd row with adaptive drafting
    ngram: int = 0                            # > 0: also every ssd row with prompt-lookup drafts
    ngram_k: list[int] = field(default_factory=list)   # each: every lookup row again,
                                              # drafting up to that many found tokens
    # (two or more of these three: also every ssd row with all of them together)
    temperature: float = 0.0                  # every row samples at this temperature (0 = greedy)
    seed: int = 0                             #   each generation from a generator seeded so
    choose_del: bool = False                  # also one ssd row per k choosing its exit and
    ssd_exits: list[int] = field(default_factory=list)   # drafts per round among these exits
                                              # ([] = the exits with modules), and one more
                                              # with the draft_vocab, adaptive_threshold
                                              # and ngram given
    # Full and draft_layer x k SSD rows again at each batch size, prompts of different
    # lengths decoded together (analysis/bench_batch.py); [] = none.
    batch_sizes: list[int] = field(default_factory=list)
    measure: list[str] = field(default_factory=list)      # dee rows: measures x thresholds
    threshold: list[float] = field(default_factory=list)  #   x cache strategies
    cache: list[str] = field(default_factory=lambda: ["propagate"])
    check_every: int = 1
    exits: list[int] = field(default_factory=list)        # dee rows' checked exits ([] =
                                              # every check_every-th; an exit-module run's
                                              # trained exits are what its DEE should check)
    calibration: list[str] = field(default_factory=list)  # + the decoder each file certifies
    compile: bool = False                     # also every full/static/ssd row compiled, beside eager
    levers: bool = False                      # the compiled step's levers one by one, and the floor
    ssd_costs: bool = False                   # an SSD round's calls priced, per draft_layer x k
    hf_baseline: bool = False                 # transformers' generate on the same weights
    hf_early_exit: list[int] = field(default_factory=list)   # + generate(assistant_early_exit=E)
    threads: int = 0                          # 0 = torch's default
    device: str = "auto"
    dtype: str = "float32"
    quantize: str = "none"                    # int8: weight-only int8 (model/quantize.py)
    # Full decoding again at each further precision (DTYPE or DTYPE+int8), interleaved
    # with the rows above: speed, bandwidth, agreement and the test text's perplexity.
    precisions: list[str] = field(default_factory=list)
    prefill_len: int = 0                      # > 0: a prompt this long prefilled per precision
    out_dir: Optional[str] = None            # results.{json,csv,md}, pareto.png (conf: logs/bench/<run>/<time>)
    tensorboard: bool = False                 # also the rows as scalars in out_dir/tensorboard/
    model: Optional[ModelConfig] = None       # model=hf_llama model.path=...
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        check_source(self)
        check_dtype(self)
        for p in self.precisions:
            precision(p)
        bad = [b for b in self.batch_sizes if b < 1]
        if bad:
            raise ConfigError(f"batch_sizes={self.batch_sizes}: {bad[0]} must be >= 1")
        if self.prefill_len < 0:
            raise ConfigError(f"prefill_len={self.prefill_len}: must be >= 0 (0 = no prefill rows)")
        for name in ("n_prompts", "prompt_len", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.draft_layer and not self.k:
            raise ConfigError("k=[]: give at least one k for the draft_layer rows (or draft_layer=[])")
        # Each ngram_k adds the lookup rows again, with a length of its own: the rows
        # without it already draft k (ngram_k=0).
        for nk in self.ngram_k:
            if nk == 0:
                raise ConfigError("ngram_k=[0]: the lookup rows without ngram_k already draft k "
                                  "found tokens; list lengths >= 1")
            SSDConfig(1, 1, ngram=self.ngram, ngram_k=nk)
        if len(set(self.ngram_k)) != len(self.ngram_k):
            raise ConfigError(f"ngram_k={self.ngram_k}: a length is listed twice")
        for k in self.k:
            SSDConfig(1, k, self.adaptive_threshold, self.draft_vocab, self.ngram)
            if self.choose_del:
                SSDConfig(None, k, choose="del", exits=list(self.ssd_exits))
        if self.choose_del and not self.k:
            raise ConfigError("choose_del=true adds one row per k: give k=[...]")
        if self.ssd_exits and not self.choose_del:
            raise ConfigError(f"ssd_exits={self.ssd_exits}: the candidates of the del rows "
                              "(give choose_del=true, or drop ssd_exits)")
        SamplingConfig(self.temperature)
        check_seed("seed", self.seed)
        if self.ssd_costs and not self.draft_layer:
            raise ConfigError("ssd_costs=true prices SSD rounds at the draft_layer exits: give "
                              "draft_layer=[...] (or ssd_costs=false)")
        if self.threads < 0:
            raise ConfigError(f"threads={self.threads}: must be >= 0 (0 = torch's default)")
        # DEE rows are measures x thresholds x caches: one list without the other makes none.
        if bool(self.measure) != bool(self.threshold):
            raise ConfigError(f"measure={self.measure}, threshold="
                              f"{self.threshold}: give both for DEE rows (or neither)")
        for m in self.measure or ["softmax"]:      # each cache and check_every, rows or not
            for c in self.cache:
                DEEConfig(m, list(self.threshold), cache=c, check_every=self.check_every,
                          exits=list(self.exits))
        if self.exits and not self.measure:
            raise ConfigError(f"exits={self.exits}: the checked exits of the DEE threshold rows "
                              "(give measure=[...] and threshold=[...] too; calibrated rows "
                              "check the exits their file certifies)")
        if self.exits and self.check_every != 1:
            raise ConfigError(f"exits={self.exits} with check_every={self.check_every}: give "
                              "one of them (the DEE rows check the exits listed, or every "
                              "check_every-th)")
        if self.temperature and (self.hf_baseline or self.batch_sizes or self.calibration):
            raise ConfigError(f"temperature={self.temperature}: the hf_baseline and batch_sizes "
                              "rows decode greedily, and a calibration certifies greedy "
                              "decoding (give temperature=0, or leave them out)")
        if self.hf_early_exit and not self.hf_baseline:
            raise ConfigError(f"hf_early_exit={self.hf_early_exit}: needs hf_baseline=true")
        if self.out_dir is not None and Path(self.out_dir).is_file():
            raise ConfigError(f"out_dir={self.out_dir!r} is a file: give a folder")
        if self.tensorboard and self.out_dir is None:
            raise ConfigError("tensorboard=true writes into out_dir/tensorboard/: give "
                              "out_dir=<folder> (or tensorboard=false)")
        for path in self.calibration:
            if not Path(path).is_file():
                raise ConfigError(f"calibration: {path!r} does not exist (python -m "
                                  "tinyskip.calibrate writes <run>/calibration.json)")


@dataclass
class TrainBenchJob:
    """``python -m tinyskip.train_bench``: the plain and layerskip presets' training steps
    timed side by side, with model FLOP utilisation against a peak measured in the run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    plain: TrainConfig = field(default_factory=TrainConfig)        # conf/train/plain.yaml
    layerskip: TrainConfig = field(default_factory=TrainConfig)    # conf/train/layerskip.yaml
    # Applied to both presets (None: each preset's own value).
    batch_size: Optional[int] = None
    seq_len: Optional[int] = None
    bf16: Optional[bool] = None
    compile: Optional[bool] = None
    steps: int = 12                 # timed steps per preset and round, spread over the schedule
    rounds: int = 3                 # presets alternate round by round (drift hits both alike)
    warmup: int = 3                 # untimed steps per preset first (and the compile, if any)
    threads: int = 0                # 0 = torch's default
    peak_size: int = 2048           # the peak's largest square product (runtime.matrix_peak)
    device: str = "auto"
    out: Optional[str] = None       # JSON with every measurement

    def __post_init__(self) -> None:
        for name in ("steps", "rounds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.model.path:
            raise ConfigError(f"model.path={self.model.path!r}: the training benchmark trains "
                              "tinyskip models from scratch (give model=<preset>)")
        if self.peak_size < 1:
            raise ConfigError(f"peak_size={self.peak_size}: must be >= 1")
        if self.warmup < 0 or self.threads < 0:
            raise ConfigError(f"warmup={self.warmup}, threads={self.threads}: must be >= 0")
        check_out(self)


@dataclass
class GpuCheckJob:
    """``python -m tinyskip.gpu_check``: the GPU tests and a short benchmark of an
    8B-shaped Llama (random weights, or real ones through ``model=hf_llama model.path=``),
    one table (see analysis/gpu_check.py). Without CUDA it says so and stops."""

    # A preset's shape with random weights (conf: model=llama3_8b), or real weights
    # through the shim's meta-device load (model=hf_llama model.path=...).
    model: ModelConfig = field(default_factory=ModelConfig)
    device: str = "cuda"            # cpu: the same checks on the CPU (tests: a tiny preset)
    dtype: str = "bfloat16"
    n_prompts: int = 2              # the first compiles the graphs; decoding is timed on the rest
    prompt_len: int = 64
    max_new_tokens: int = 128
    draft_layer: int = 8
    k: int = 4
    compile: bool = True            # false: eager rows only (the CPU test of the logic)
    tests: bool = True              # pytest -m gpu first
    fsdp: bool = True               # a few FSDP training steps on every GPU present
    fsdp_layers: int = 4            # of the model's shape (4 of the 8B: 1.1B parameters)
    fsdp_steps: int = 6
    stream_mib: int = 4096          # the streaming read the bandwidth % divide by
    seed: int = 0
    out: Optional[str] = None       # the table's rows as JSON

    def __post_init__(self) -> None:
        check_dtype(self)
        if self.device not in ("cuda", "cpu"):
            raise ConfigError(f"device={self.device!r}: must be cuda or cpu")
        for name in ("prompt_len", "max_new_tokens", "stream_mib", "fsdp_layers", "fsdp_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.n_prompts < 2:
            raise ConfigError(f"n_prompts={self.n_prompts}: must be >= 2 (the first one "
                              "compiles, the others are timed)")
        if not self.model.path:     # a preset's shape is known now (a folder's, once loaded)
            SSDConfig(self.draft_layer, self.k).validate(self.model.num_hidden_layers)
            if self.prompt_len + self.max_new_tokens > self.model.max_position_embeddings:
                raise ConfigError(f"prompt_len + max_new_tokens = "
                                  f"{self.prompt_len + self.max_new_tokens}: past the model's "
                                  f"context, {self.model.max_position_embeddings}")
        check_out(self)
