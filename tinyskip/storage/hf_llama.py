"""Hugging Face Llama <-> tinyskip: configs, weights (safetensors) and tokenizers.

Parameter names match up to the ``model.`` prefix, so weights move by a rename.
Import builds the model on the meta device and loads shard by shard straight into the
target dtype and device (each tensor is read, cast and assigned, then freed), so peak
memory stays close to the size of the weights. Anything the shim does not implement
(other rope scaling types, attention or MLP biases, another architecture, an explicit
head_dim that differs from hidden_size / heads) is refused, never silently mis-loaded.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..atomic import publish_dir, temp_dir, write_json_atomic
from ..config import ConfigError, ModelConfig, RopeScaling, UserError, first_line
from ..model.transformer import Transformer
from ..runtime import DTYPES
from .checkpoint import load_model, read_json, resolve_checkpoint
from .data import encode_text, load_tokenizer
from .gguf import gguf_folder, is_gguf
from .sentencepiece_json import to_tokenizer

PREFIX = "model."
# What a Hugging Face Llama's tokenizer is made of, copied as it is wherever its weights go
# (an export, a continual run's checkpoint): rebuilding it from tokenizer.model would
# change how it adds BOS.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json")
# tokenizer_config.json's key for the token a tinyskip model learnt line breaks as (EOS):
# its tokenizer.json alone would encode a line break as an unknown piece.
LINE_BREAK = "tinyskip_line_break_token"


class HFConfigError(UserError):
    """A Hugging Face checkpoint the shim cannot load faithfully."""


# -- configs -----------------------------------------------------------------------------
def _need(d: dict, key: str, where: str = "config.json"):
    if key not in d:
        raise HFConfigError(f"{where} has no {key!r}: the Llama shim needs it")
    return d[key]


def config_from_hf(hf: dict, name: str = "hf_llama") -> ModelConfig:
    arch = hf.get("architectures") or ["LlamaForCausalLM"]
    if hf.get("model_type", "llama") != "llama" or arch[0] != "LlamaForCausalLM":
        raise HFConfigError(f"model_type={hf.get('model_type')!r} architectures={arch}: only "
                            "Llama (LlamaForCausalLM) checkpoints are supported")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise HFConfigError(f"{flag}=true is not supported (tinyskip's Llama has no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        raise HFConfigError(f"hidden_act={hf['hidden_act']!r}: only silu is supported")
    heads, hidden = _need(hf, "num_attention_heads"), _need(hf, "hidden_size")
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != hidden // heads:
        raise HFConfigError(f"head_dim={head_dim} differs from hidden_size/num_attention_heads="
                            f"{hidden // heads}: not supported")
    # transformers 4 writes rope_theta + rope_scaling; transformers 5 writes rope_parameters.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
    kind = rope.pop("rope_type", rope.pop("type", "default"))
    scaling = None
    if kind == "llama3":
        fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        scaling = RopeScaling(**{f: _need(rope, f, "config.json rope_scaling (llama3)")
                                 for f in fields})
    elif kind != "default":
        raise HFConfigError(f"rope scaling type {kind!r} is not supported (only llama3 and none)")
    try:
        return ModelConfig(
            name=name, vocab_size=_need(hf, "vocab_size"), hidden_size=hidden,
            num_hidden_layers=_need(hf, "num_hidden_layers"), num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            intermediate_size=_need(hf, "intermediate_size"),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_scaling=scaling, tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
            initializer_range=hf.get("initializer_range", 0.02))
    except TypeError as e:           # a value of the wrong type ("hidden_size": "64")
        raise HFConfigError(f"config.json has a value of the wrong type ({e})")
    except ConfigError as e:         # a shape the model cannot take, named by its field
        raise HFConfigError(f"config.json: {e}")


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """A config.json that transformers 4 and 5 both read (rope_theta + rope_scaling)."""
    scaling = None
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        scaling = {"rope_type": rs.rope_type, "factor": rs.factor,
                   "low_freq_factor": rs.low_freq_factor, "high_freq_factor": rs.high_freq_factor,
                   "original_max_position_embeddings": rs.original_max_position_embeddings}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": scaling,
        "tie_word_embeddings": cfg.tie_word_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "attention_dropout": cfg.attention_dropout,
        "initializer_range": cfg.initializer_range, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id, "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True}


# -- import ------------------------------------------------------------------------------
def resolve_folder(path_or_id: str) -> Path:
    """A local folder as is; a GGUF file as the folder made from it (gguf.py); otherwise a
    Hub id, downloaded through huggingface_hub."""
    if is_gguf(path_or_id):
        return gguf_folder(path_or_id)
    local = Path(path_or_id).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise HFConfigError(f"model.path={path_or_id!r} has no config.json")
        return local
    if path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1:
        raise HFConfigError(f"model.path={path_or_id!r}: no such folder, and not a Hub id "
                            "of the form owner/name")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise HFConfigError("loading from the Hub needs huggingface_hub: pip install -e '.[hf]'")
    try:
        # (with what a tinyskip export adds: its exit modules and calibration, hash-checked
        # when loaded; "*.safetensors" takes exits/exit_modules.safetensors too)
        return Path(snapshot_download(path_or_id, allow_patterns=[
            "config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer.model", "tokenizer_config.json", "generation_config.json",
            "exits/exit_modules.json", "calibration.json"]))
    except Exception as e:  # network, authentication, missing repository
        raise HFConfigError(f"cannot download {path_or_id!r} from the Hub: {first_line(e)}")


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_need(read_json(index), "weight_map", index.name).values()))
        return [folder / s for s in shards]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        return bins
    raise HFConfigError(f"{folder} holds no model.safetensors (or sharded safetensors)")


def _tensors(file: Path):
    """(name, tensor) pairs of one shard, read lazily from safetensors."""
    if file.suffix == ".bin":   # pickles: tensors only, never arbitrary objects
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            raise HFConfigError(f"{file.name} was refused: it holds more than tensors and is "
                                f"only read with weights_only=True ({first_line(e)})")
        yield from state.items()
        return
    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():
            yield key, f.get_tensor(key)


def load_hf_llama(path_or_id: str, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> tuple[Transformer, Path]:
    folder = resolve_folder(path_or_id)
    try:
        cfg = config_from_hf(read_json(folder / "config.json"))
    except HFConfigError as e:
        raise HFConfigError(f"model.path={path_or_id!r}: {e}")
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = dict(model.state_dict())
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    seen = set()
    for file in weight_files(folder):
        for hf_name, tensor in _tensors(file):
            name = hf_name.removeprefix(PREFIX)
            if name.endswith("rotary_emb.inv_freq"):       # a buffer some exports carry
                continue
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            if name not in expected:
                raise HFConfigError(f"{file.name}: unexpected tensor {hf_name!r} for a Llama model")
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise HFConfigError(f"{file.name}: {hf_name} has shape {tuple(tensor.shape)}, "
                                    f"config.json implies {tuple(expected[name].shape)}")
            model.load_state_dict({name: tensor.to(device=device, dtype=dtype)},
                                  strict=False, assign=True)
            seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise HFConfigError(f"{folder}: missing weights {missing[:4]}")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.reset_rope(device)
    return model.eval(), folder


# -- tokenizers --------------------------------------------------------------------------
class HFTokenizer:
    """encode / decode / stop_ids over tokenizer.json (tokenizers) or tokenizer.model.

    A tokenizer.json adds special tokens (BOS or none) with its own post-processor, as
    transformers does; a bare tokenizer.model is Llama's SentencePiece tokenizer, which
    adds BOS unless its tokenizer_config.json says ``add_bos_token: false``. A tinyskip
    export's tokenizer_config.json names the token its model learnt line breaks as
    (``LINE_BREAK``: EOS), and text is then encoded line by line as its corpus was.
    """

    def __init__(self, folder: Path, cfg: ModelConfig):
        self.stops = frozenset(cfg.stop_ids)
        self.bos = self.line_break = None
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer
            try:
                self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as e:  # tokenizers raises a bare Exception on a bad file
                raise HFConfigError(f"{folder / 'tokenizer.json'} is not a tokenizer ({e})")
            self.kind = "json"
            size = max(self.tok.get_vocab(with_added_tokens=True).values()) + 1
        elif (folder / "tokenizer.model").is_file():
            self.tok, self.kind = load_tokenizer(folder / "tokenizer.model"), "sp"
            size = self.tok.get_piece_size()
            tok_cfg = folder / "tokenizer_config.json"
            if not tok_cfg.is_file() or read_json(tok_cfg).get("add_bos_token", True):
                self.bos = cfg.bos_token_id
        else:
            raise HFConfigError(f"{folder} has no tokenizer.json or tokenizer.model")
        if size > cfg.vocab_size:
            raise HFConfigError(f"{folder}: the tokenizer has {size} tokens, more than the "
                                f"model's vocab_size={cfg.vocab_size}")
        tok_cfg = folder / "tokenizer_config.json"
        settings = read_json(tok_cfg) if tok_cfg.is_file() else {}
        line_break = settings.get(LINE_BREAK) if isinstance(settings, dict) else None
        if line_break is not None:
            self.line_break = (self.tok.token_to_id(line_break) if self.kind == "json"
                               else self.tok.piece_to_id(line_break))
            if self.line_break is None or self.encode(line_break, False) == []:
                raise HFConfigError(f"{tok_cfg}: {LINE_BREAK}={line_break!r} is not a token "
                                    "of the tokenizer")

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of ``text``; with ``special`` (a prompt), the special tokens the
        tokenizer's own rules add around it (BOS or none)."""
        if self.line_break is not None and "\n" in text:
            return encode_text(lambda line: self.encode(line, special=False), self.line_break,
                               text)
        if self.kind == "json":
            return self.tok.encode(text, add_special_tokens=special).ids
        return ([self.bos] if special and self.bos is not None else []) + self.tok.encode(text)

    @property
    def bos_id(self) -> Optional[int]:
        """The token the tokenizer's rules put before a text (BOS), or None: found by
        encoding with and without them (a post-processor may also append tokens)."""
        if self.kind == "sp":
            return self.bos
        plain, full = self.encode("a", special=False), self.encode("a")
        lead = next((full[:i] for i in range(len(full) - len(plain) + 1)
                     if full[i:i + len(plain)] == plain), [])
        return lead[-1] if lead else None

    def decode(self, ids: list[int]) -> str:
        if self.kind == "json":
            return self.tok.decode(ids, skip_special_tokens=True)
        return self.tok.decode([i for i in ids if i != self.bos and i not in self.stops])

    def stop_ids(self) -> frozenset[int]:
        return self.stops


# -- export ------------------------------------------------------------------------------
def export_hf(model: Transformer, tokenizer_file: Optional[Path], out: Path,
              dtype: torch.dtype = torch.float32,
              fill: Optional[Callable[[Path], None]] = None) -> Path:
    """Write a Hugging Face Llama folder (config, safetensors, tokenizer); atomic rename.
    ``fill(folder)`` adds files (a card, exit modules) to the folder before it is published."""
    out = Path(out)
    if out.exists():
        raise UserError(f"out={out} already exists: choose a new folder")
    tmp = temp_dir(out.parent, f".{out.name}.tmp-")
    try:
        write_hf_model(model, tmp, dtype)
        if tokenizer_file is not None:
            _export_tokenizer(tokenizer_file, tmp)
        if fill is not None:
            fill(tmp)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_hf_model(model: Transformer, folder: Path, dtype: torch.dtype = torch.float32) -> None:
    """The model as Hugging Face Llama files in ``folder``: model.safetensors (a tied head
    stored once, as the embedding), config.json and generation_config.json."""
    cfg = model.config
    state = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        hf_name = name if name == "lm_head.weight" else PREFIX + name
        state[hf_name] = t.detach().to(device="cpu", dtype=dtype).contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_json_atomic(folder / "config.json", config_to_hf(cfg, dtype))
    write_json_atomic(folder / "generation_config.json",
                      {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id})


def _export_tokenizer(tokenizer_file: Path, folder: Path) -> None:
    """tokenizer.model for SentencePiece users, and tokenizer.json, which AutoTokenizer
    loads as installed (converting tokenizer.model itself needs protobuf)."""
    shutil.copyfile(tokenizer_file, folder / "tokenizer.model")
    to_tokenizer(tokenizer_file).save(str(folder / "tokenizer.json"))
    sp = load_tokenizer(tokenizer_file)
    # PreTrainedTokenizerFast: transformers uses tokenizer.json as it is (a Llama class
    # would rebuild it with Llama's own normaliser). tinyskip trains without BOS and the
    # tokenizer.json has no post-processor, so nothing is added around the text.
    write_json_atomic(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False,
        "add_eos_token": False, "bos_token": sp.id_to_piece(sp.bos_id()),
        "eos_token": sp.id_to_piece(sp.eos_id()), "unk_token": sp.id_to_piece(sp.unk_id()),
        LINE_BREAK: sp.id_to_piece(sp.eos_id())})


def export_run(path: Path | str, out: Path | str, dtype: str = "float32") -> Path:
    """A tinyskip checkpoint (folder or run) as a Hugging Face Llama folder at ``out``."""
    ckpt = resolve_checkpoint(path)
    model, _ = load_model(ckpt)
    return export_hf(model, ckpt / "tokenizer.model", Path(out), DTYPES[dtype])
