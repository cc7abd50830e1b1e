"""Hugging Face Llama <-> tinyskip: configs, weights (safetensors) and tokenizers.

Parameter names match up to the ``model.`` prefix, so weights move by a rename.
Import builds the model on the meta device and loads shard by shard straight into the
target dtype and device (each tensor is read, cast and assigned, then freed), so peak
memory stays close to the size of the weights. Anything the shim does not implement
(other rope scaling types, attention or MLP biases, another architecture, an explicit
head_dim that differs from hidden_size / heads) is refused, never silently mis-loaded.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import write_json_atomic
from .config import ModelConfig, RopeScaling, UserError
from .model import Transformer

PREFIX = "model."


class HFConfigError(UserError):
    """A Hugging Face checkpoint the shim cannot load faithfully."""


# -- configs -----------------------------------------------------------------------------
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
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != hf["hidden_size"] // heads:
        raise HFConfigError(f"head_dim={head_dim} differs from hidden_size/num_attention_heads="
                            f"{hf['hidden_size'] // heads}: not supported")
    # transformers 4 writes rope_theta + rope_scaling; transformers 5 writes rope_parameters.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
    kind = rope.pop("rope_type", rope.pop("type", "default"))
    scaling = None
    if kind == "llama3":
        fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        scaling = RopeScaling(**{f: rope[f] for f in fields})
    elif kind != "default":
        raise HFConfigError(f"rope scaling type {kind!r} is not supported (only llama3 and none)")
    eos = hf.get("eos_token_id")
    return ModelConfig(
        name=name, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        initializer_range=hf.get("initializer_range", 0.02))


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
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "initializer_range": cfg.initializer_range, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id, "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True}


# -- import ------------------------------------------------------------------------------
def resolve_folder(path_or_id: str) -> Path:
    """A local folder as is; otherwise a Hub id, downloaded through huggingface_hub."""
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
        return Path(snapshot_download(path_or_id, allow_patterns=[
            "config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer.model", "tokenizer_config.json", "generation_config.json"]))
    except Exception as e:  # network, authentication, missing repository
        raise HFConfigError(f"cannot download {path_or_id!r} from the Hub: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
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
                                f"only read with weights_only=True ({str(e).splitlines()[0]})")
        yield from state.items()
        return
    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():
            yield key, f.get_tensor(key)


def load_hf_llama(path_or_id: str, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> tuple[Transformer, Path]:
    folder = resolve_folder(path_or_id)
    cfg = config_from_hf(json.loads((folder / "config.json").read_text()))
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
    """encode / decode / eos_id over tokenizer.json (tokenizers) or tokenizer.model (SentencePiece)."""

    def __init__(self, folder: Path, cfg: ModelConfig):
        self.bos, self.eos = cfg.bos_token_id, cfg.eos_token_id
        tok_cfg = folder / "tokenizer_config.json"
        # Llama tokenizers add BOS unless their tokenizer_config.json says otherwise.
        if tok_cfg.is_file() and not json.loads(tok_cfg.read_text()).get("add_bos_token", True):
            self.bos = None
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer
            self.tok, self.kind = Tokenizer.from_file(str(folder / "tokenizer.json")), "json"
        elif (folder / "tokenizer.model").is_file():
            import sentencepiece as spm
            self.tok = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
            self.kind = "sp"
        else:
            raise HFConfigError(f"{folder} has no tokenizer.json or tokenizer.model")

    def encode(self, text: str) -> list[int]:
        """Token ids, with the BOS token in front where the tokenizer adds one."""
        ids = (self.tok.encode(text, add_special_tokens=False).ids if self.kind == "json"
               else self.tok.encode(text))
        return ([self.bos] if self.bos is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        if self.kind == "json":
            return self.tok.decode(ids, skip_special_tokens=True)
        return self.tok.decode([i for i in ids if i not in (self.bos, self.eos)])

    def eos_id(self) -> int:
        return -1 if self.eos is None else self.eos


# -- export ------------------------------------------------------------------------------
def export_hf(model: Transformer, tokenizer_file: Optional[Path], out: Path,
              dtype: torch.dtype = torch.float32) -> Path:
    """Write a Hugging Face Llama folder (config, safetensors, tokenizer); atomic rename."""
    out = Path(out)
    if out.exists():
        raise UserError(f"out={out} already exists: choose a new folder")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = model.config
    state = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        hf_name = name if name == "lm_head.weight" else PREFIX + name
        state[hf_name] = t.detach().to(dtype).contiguous()
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    write_json_atomic(tmp / "config.json", config_to_hf(cfg, dtype))
    write_json_atomic(tmp / "generation_config.json",
                      {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id})
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, tmp / "tokenizer.model")
        # tinyskip trains without a BOS token, so the exported tokenizer adds none.
        write_json_atomic(tmp / "tokenizer_config.json", {
            "tokenizer_class": "LlamaTokenizer", "add_bos_token": False,
            "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
            "unk_token": "<unk>", "legacy": True})
    os.replace(tmp, out)
    return out
