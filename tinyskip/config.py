"""Plain dataclass configs shared by the library and the entry points.

Library modules take these dataclasses; only the entry points know about Hydra
(see ``tinyskip/cli.py``). Field names of ``ModelConfig`` follow Hugging Face's
``LlamaConfig`` so that the Llama shim maps configs by name.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

# The run ``python -m tinyskip.train`` writes by default (conf/train.yaml picks model
# l6_d128, and a run is named after its model): later commands load it when no run is given.
DEFAULT_RUN = "l6_d128"


class UserError(Exception):
    """Bad input from a user: entry points print its message as one line and exit 2."""


def first_line(e: BaseException) -> str:
    """An exception's first line of text (its type's name when it has none): what a
    one-line error quotes of a library's reason."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class ConfigError(UserError, ValueError):
    """A configuration value is out of range; the message names the field."""


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not (value > 0 and math.isfinite(value)):        # nan and inf slip past "<= 0"
            raise ConfigError(f"{type(obj).__name__}.{name}={value}: must be > 0 (and finite)")


def _probability(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{type(obj).__name__}.{name}={value}: must be in [0, 1]")


# Seeds feed torch and numpy generators, also as seed * 1_000_003 + step (data order):
# below 2**32 that stays inside the 64-bit range every generator accepts.
SEED_MAX = 2 ** 32 - 1


def check_seed(name: str, value: int) -> None:
    if not 0 <= value <= SEED_MAX:
        raise ConfigError(f"{name}={value}: must be in 0..{SEED_MAX}")


def _choice(obj: Any, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in allowed:
        raise ConfigError(
            f"{type(obj).__name__}.{name}={value!r}: must be one of {', '.join(allowed)}"
        )


@dataclass
class RopeScaling:
    """Llama 3.1/3.2 frequency-dependent RoPE scaling (``rope_type: llama3``)."""

    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        _choice(self, "rope_type", ("llama3",))
        _positive(self, "factor", "low_freq_factor", "high_freq_factor",
                  "original_max_position_embeddings")
        if self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(
                f"RopeScaling.high_freq_factor={self.high_freq_factor}: must exceed "
                f"low_freq_factor={self.low_freq_factor}")


@dataclass
class ModelConfig:
    """Shape of a Llama-style decoder. ``vocab_size`` is set from the tokenizer at training time."""

    name: str = "l6_d128"
    vocab_size: int = 8000
    hidden_size: int = 128
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 1024
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    tie_word_embeddings: bool = True
    bos_token_id: Optional[int] = None
    # One stop token, or a list (Llama 3 instruct models end a turn with any of several).
    eos_token_id: Any = None
    initializer_range: float = 0.02
    # Dropout in training (off in eval and decoding): on the attention probabilities
    # (Hugging Face's name), on each block's two residual branches, and on the embeddings.
    # Models imported from Hugging Face start with all three off.
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    embedding_dropout: float = 0.0
    # A Hugging Face Llama folder or Hub id: its config.json and weights replace the
    # fields above (``model=hf_llama model.path=...``).
    path: Optional[str] = None

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        eos = self.eos_token_id
        if isinstance(eos, (list, tuple)):
            self.eos_token_id = eos = list(eos)
        if not (eos is None or isinstance(eos, int)
                or (isinstance(eos, list) and eos and all(isinstance(i, int) for i in eos))):
            raise ConfigError(f"ModelConfig.eos_token_id={eos!r}: must be a token id or a "
                              "non-empty list of token ids")
        _positive(self, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "intermediate_size", "max_position_embeddings",
                  "rms_norm_eps", "rope_theta")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"ModelConfig.num_attention_heads={self.num_attention_heads}: must divide "
                f"hidden_size={self.hidden_size}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"ModelConfig.num_key_value_heads={self.num_key_value_heads}: must divide "
                f"num_attention_heads={self.num_attention_heads}")
        for name in ("attention_dropout", "hidden_dropout", "embedding_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"ModelConfig.{name}={getattr(self, name)}: must be in [0, 1)")
        if self.head_dim % 2:
            raise ConfigError(f"ModelConfig.hidden_size={self.hidden_size}: head_dim "
                              f"{self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def stop_ids(self) -> list[int]:
        """Every EOS id (none when eos_token_id is unset)."""
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"model config has unknown fields {unknown}")
        return cls(**d)


@dataclass
class DataConfig:
    """WikiText-2 through ``datasets.load_dataset(path, name)`` (or a folder of train.txt,
    validation.txt and test.txt, whose ``name`` is ignored) and a SentencePiece tokenizer."""

    path: str = "Salesforce/wikitext"
    name: str = "wikitext-2-raw-v1"
    vocab_size: int = 8000
    tokenizer_model_type: str = "bpe"
    # Where tokenizers and token arrays are cached; None = $TINYSKIP_CACHE or ~/.cache/tinyskip.
    cache_dir: Optional[str] = None
    # Use only the first N rows of every split (tests and smoke runs); None = all rows.
    max_rows: Optional[int] = None

    def __post_init__(self) -> None:
        _positive(self, "vocab_size")
        _choice(self, "tokenizer_model_type", ("bpe", "unigram"))
        if self.max_rows is not None:
            _positive(self, "max_rows")


# Exit modules (exit_modules.py): what sits between an exit and the shared head.
EXIT_MODULE_KINDS = ("block", "mlp", "attention", "norm")


@dataclass
class TrainConfig:
    """Optimisation, LayerDrop, early-exit loss and checkpointing knobs (see ``conf/train/``)."""

    preset: str = "plain"
    max_steps: int = 4000
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 1337
    # LayerDrop: p_l = S(t) * D(l) * p_max, drawn per sample.
    layerdrop_p_max: float = 0.0
    layerdrop_depth: str = "exp"
    layerdrop_time: str = "constant"
    # Early-exit loss through the shared head.
    exit_weighting: str = "none"
    e_scale: float = 1.0
    curriculum: str = "none"
    curriculum_rotation: int = 2
    # Each earlier exit scores this fraction of the batch's tokens (a fresh random subset
    # per exit and step; the last exit scores them all): an unbiased estimate of the same
    # loss for a fraction of the head's cost, which at d=128 equals all the blocks'.
    exit_token_fraction: float = 1.0
    # Self-distillation of the earlier exits (layerskip): distill_weight times their
    # weighted mean KL(p_last || p_exit) on the tokens they score (losses.py).
    distill_weight: float = 0.0
    distill_temperature: float = 1.0          # also the exit modules' KL temperature
    # Exit modules on a frozen backbone (preset balcony, exit_training.py).
    backbone: Optional[str] = None            # a tinyskip run or folder (HF: model=hf_llama)
    exit_layers: list[int] = dataclasses.field(default_factory=list)   # [] = L/4, L/2, 3L/4
    exit_kind: str = "block"                  # block | mlp | attention | norm
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    exit_cache: str = "online"                # online | offline (hidden states cached on disk)
    exit_cache_dir: Optional[str] = None      # offline: this folder (default: keyed, shared)
    # Runtime.
    device: str = "auto"
    # Data parallelism under torchrun: ddp replicates the model on every rank; fsdp shards
    # the trained weights and their optimizer state (FSDP2, training/sharding.py).
    parallel: str = "ddp"
    # bf16 autocast (fp32 master weights). None: where the device runs bf16 matmuls at
    # full speed (runtime.bf16_native), fp32 elsewhere; job.json records which.
    bf16: Optional[bool] = None
    compile: bool = False
    eval_every: int = 500
    eval_batches: int = 0
    log_every: int = 10
    save_every: int = 250
    # TensorBoard event files in <run>/tensorboard/ (tb_log.py): training scalars every
    # log_every steps and every evaluation's per-exit ones (needs .[tensorboard]).
    tensorboard: bool = False
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        _positive(self, "max_steps", "batch_size", "seq_len", "lr", "eval_every", "log_every",
                  "save_every", "curriculum_rotation", "distill_temperature")
        _probability(self, "layerdrop_p_max", "min_lr_ratio", "e_scale")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("TrainConfig.warmup_steps, weight_decay, grad_clip must be >= 0")
        if not 0.0 < self.exit_token_fraction <= 1.0:
            raise ConfigError(f"TrainConfig.exit_token_fraction={self.exit_token_fraction}: "
                              "must be in (0, 1]")
        if not (self.distill_weight >= 0 and math.isfinite(self.distill_weight)):
            raise ConfigError(f"TrainConfig.distill_weight={self.distill_weight}: must be >= 0 "
                              "(and finite)")
        if self.eval_batches < 0:
            raise ConfigError(f"TrainConfig.eval_batches={self.eval_batches}: must be >= 0 "
                              "(0 = the whole validation split)")
        check_seed("TrainConfig.seed", self.seed)
        _choice(self, "layerdrop_depth", ("uniform", "linear", "exp"))
        _choice(self, "layerdrop_time", ("constant", "exp"))
        _choice(self, "exit_weighting", ("none", "uniform", "linear", "calm", "sum_l", "layerskip"))
        _choice(self, "curriculum", ("none", "rotational", "gradual"))
        _choice(self, "device", ("auto", "cpu", "cuda"))
        _choice(self, "parallel", ("ddp", "fsdp"))
        _choice(self, "exit_kind", EXIT_MODULE_KINDS)
        _choice(self, "exit_cache", ("online", "offline"))
        if self.kl_weight < 0 or self.ce_weight < 0:
            raise ConfigError(f"train.kl_weight={self.kl_weight}, train.ce_weight="
                              f"{self.ce_weight}: must be >= 0")
        if self.preset == "balcony" and self.kl_weight == 0 and self.ce_weight == 0:
            raise ConfigError("train.kl_weight=0 and train.ce_weight=0: the exit modules would "
                              "learn nothing (Balcony: kl_weight=1, ce_weight=0)")


# -- decoding modes -----------------------------------------------------------------------

# Below this, logits / temperature overflows float32 for ordinary logits (and the
# distribution is greedy to any precision anyway): temperature=0 is greedy decoding.
MIN_TEMPERATURE = 1e-4


@dataclass
class SamplingConfig:
    """temperature 0 = greedy; top_k 0 and top_p 1 = off. The same processing is applied
    to the draft and the full model in speculative sampling."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (self.temperature == 0 or self.temperature >= MIN_TEMPERATURE):
            raise ConfigError(f"temperature={self.temperature}: must be 0 (greedy) or >= "
                              f"{MIN_TEMPERATURE} (smaller values overflow the logits)")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k}: must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p}: must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# Exits are numbered by blocks run: exit E (1..L) is the head on the output of the E-th
# block (``layers[E - 1]``).

MODES = ("full", "static", "ssd", "dee")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r}: must be one of {', '.join(MODES)}")


SSD_CHOICES = ("fixed", "del")


@dataclass
class SSDConfig:
    """``mode=ssd``: draft with exit ``draft_layer`` (blocks [0, E)), verify with the rest.

    ``choose="del"`` picks the exit among ``exits`` and the number of drafts (0..k) anew
    every round from the exits' running agreement with the full model (decode/chooser.py);
    ``draft_layer`` is then the first round's exit (None: the median candidate)."""

    draft_layer: Optional[int] = None  # E: the draft runs blocks [0, E), 1 <= E <= L
    k: int = 4                       # drafts per round (at most)
    adaptive_threshold: float = 0.0  # stop drafting when the draft's top-1 prob falls below
    draft_vocab: int = 0             # score drafts over the N most frequent tokens (0 = all)
    ngram: int = 0                   # > 0: prompt-lookup drafts where the last n tokens recur
    choose: str = "fixed"            # fixed: draft_layer and k every round | del: chosen
    # del's candidate exits (ssd_exits= in infer and bench); [] = the exits with modules.
    exits: list[int] = dataclasses.field(default_factory=list)
    # Drafts a prompt-lookup round may propose (0 = k). Found drafts cost no model call and
    # a verify costs about one step whatever its width where decoding reads the weights, so
    # lookup rounds can propose more than exit rounds, whose every draft runs E blocks.
    ngram_k: int = 0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"k={self.k}: must be >= 1 (draft tokens per round)")
        if not 0.0 <= self.adaptive_threshold < 1.0:
            raise ConfigError(f"adaptive_threshold={self.adaptive_threshold}: must be in [0, 1)")
        if self.draft_vocab < 0:
            raise ConfigError(f"draft_vocab={self.draft_vocab}: must be >= 0 (0 = full vocabulary)")
        if self.ngram < 0:
            raise ConfigError(f"ngram={self.ngram}: must be >= 1 (the tokens a prompt-lookup "
                              "draft matches), or 0 for exit drafts only")
        if self.ngram_k < 0:
            raise ConfigError(f"ngram_k={self.ngram_k}: must be >= 1 (drafts a prompt-lookup "
                              "round may propose), or 0 for k")
        if self.ngram_k and not self.ngram:
            raise ConfigError(f"ngram_k={self.ngram_k}: the length of prompt-lookup drafts "
                              "(give ngram=n too, or drop ngram_k)")
        _choice(self, "choose", SSD_CHOICES)
        if self.choose == "fixed" and self.exits:
            raise ConfigError(f"ssd_exits={self.exits}: the candidate exits of choose=del "
                              "(give choose=del, or drop ssd_exits)")
        if len(set(self.exits)) != len(self.exits):
            raise ConfigError(f"ssd_exits={self.exits}: an exit is listed twice")

    def validate(self, num_layers: int) -> None:
        """What only the model can tell: the draft exit against its L blocks."""
        if self.draft_layer is None:
            if self.choose == "fixed":
                raise UserError("mode=ssd needs draft_layer=<1..L> (or choose=del)")
        elif not 1 <= self.draft_layer <= num_layers:
            raise UserError(f"draft_layer={self.draft_layer}: must be in 1..{num_layers} for "
                            f"this {num_layers}-layer model (E = L drafts with the full model)")
        bad = [e for e in self.exits if not 1 <= e < num_layers]
        if bad:
            raise UserError(f"ssd_exits={self.exits}: {bad[0]} is outside 1..{num_layers - 1} "
                            f"(exit {num_layers} is the full model, which verifies)")

    def candidates(self, num_layers: int, module_exits: list[int]) -> list[int]:
        """del's candidate exits, sorted, on a model of L blocks whose exit modules sit at
        ``module_exits`` ([] = none): where it has modules, only those exits were trained
        (every candidate needs one); without, all share the head (LayerSkip), any 1..L-1."""
        self.validate(num_layers)
        exits = sorted(self.exits or module_exits)
        if not exits:
            raise UserError("choose=del needs ssd_exits=[...] (candidate exits in "
                            f"1..{num_layers - 1}): this model has no exit modules to default to")
        missing = [e for e in exits if module_exits and e not in module_exits]
        if missing:
            raise UserError(f"ssd_exits={self.exits}: exit {missing[0]} has no exit module; "
                            f"this model's exits with modules are {sorted(module_exits)}")
        if self.draft_layer is not None and self.draft_layer not in exits:
            raise UserError(f"draft_layer={self.draft_layer}: the first round's exit must be "
                            f"one of the candidates {exits}")
        return exits

    @property
    def lookup_k(self) -> int:
        """Drafts a prompt-lookup round may propose."""
        return self.ngram_k or self.k

    @property
    def max_drafts(self) -> int:
        """Drafts any round may propose: what a round's buffers must hold."""
        return max(self.k, self.lookup_k) if self.ngram else self.k

    def first_exit(self, exits: list[int]) -> int:
        """The first round's exit: ``draft_layer``, else the median candidate."""
        return self.draft_layer if self.draft_layer is not None else exits[(len(exits) - 1) // 2]


# Confidence measures of dynamic early exit and the range of each (higher = more
# confident); a threshold outside its measure's range is refused, except +inf = never exit.
MEASURE_RANGES: dict[str, tuple[float, float]] = {
    "softmax": (0.0, 1.0),       # top-1 probability
    "margin": (0.0, 1.0),        # top-1 minus top-2 probability
    "entropy": (0.0, 1.0),       # 1 - H(p) / ln V
    "saturation": (-1.0, 1.0),   # cosine of the hidden states at consecutive checked exits
    "repeat": (0.0, 1.0),        # 1 when the argmax equals the previous checked exit's
    "convergence": (0.0, 1.0),   # 1 - |change of the top-1 probability| since the previous one
    "classifier": (0.0, 1.0),    # CALM's learned exit classifier: P(exit argmax == last's)
}
CACHE_STRATEGIES = ("propagate", "recompute", "copy")


@dataclass
class DEEConfig:
    """``mode=dee``: each token leaves at the first checked exit whose confidence reaches
    that exit's threshold, else runs all L blocks."""

    measure: str = "softmax"
    threshold: list[float] = dataclasses.field(default_factory=list)  # one, or one per exit
    exits: list[int] = dataclasses.field(default_factory=list)        # [] = every check_every-th
    check_every: int = 1
    cache: str = "propagate"         # how skipped layers get their K/V (see decode/dee.py)
    decay_tau: float = 0.0           # CALM's decaying threshold over the step (0 = constant)

    def __post_init__(self) -> None:
        if self.measure not in MEASURE_RANGES:
            raise ConfigError(f"measure={self.measure!r}: must be one of "
                              f"{', '.join(MEASURE_RANGES)}")
        if self.cache not in CACHE_STRATEGIES:
            raise ConfigError(f"cache={self.cache!r}: must be one of {', '.join(CACHE_STRATEGIES)}")
        if self.check_every < 1:
            raise ConfigError(f"check_every={self.check_every}: must be >= 1")
        if self.decay_tau < 0:
            raise ConfigError(f"decay_tau={self.decay_tau}: must be >= 0 (0 = constant threshold)")
        lo, hi = MEASURE_RANGES[self.measure]
        for t in self.threshold:
            if t != float("inf") and not lo <= t <= hi:
                raise ConfigError(f"threshold={t}: outside the range [{lo}, {hi}] of measure="
                                  f"{self.measure} (inf = never exit)")
        if self.decay_tau and any(t < 0 for t in self.threshold):
            raise ConfigError(f"decay_tau={self.decay_tau} with threshold={self.threshold}: the "
                              "decaying schedule scales a threshold down, which a negative one "
                              "would tighten instead")

    def checked_exits(self, num_layers: int) -> list[int]:
        if self.exits:
            return sorted(self.exits)
        return list(range(self.check_every, num_layers, self.check_every))

    def validate(self, num_layers: int) -> list[float]:
        """What only the model can tell (the checked exits against its L blocks); returns
        one threshold per checked exit."""
        bad = [e for e in self.exits if not 1 <= e < num_layers]
        if bad or list(self.exits) != sorted(set(self.exits)):
            raise UserError(f"exits={self.exits}: checked exits must be increasing and in "
                            f"1..{num_layers - 1} (exit {num_layers} is the full model)")
        exits = self.checked_exits(num_layers)
        if not exits:
            raise UserError(f"check_every={self.check_every}: checks no exit of this "
                            f"{num_layers}-layer model (must be < {num_layers})")
        if not self.threshold:
            raise UserError("mode=dee needs threshold=<value or one per checked exit> or a "
                            "calibration file (python -m tinyskip.calibrate)")
        if len(self.threshold) not in (1, len(exits)):
            raise UserError(f"threshold={self.threshold}: give one value or one per checked "
                            f"exit {exits}")
        return list(self.threshold) * len(exits) if len(self.threshold) == 1 else list(self.threshold)
