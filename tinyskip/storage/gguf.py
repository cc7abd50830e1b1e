"""GGUF files (the format small Llama models ship in for CPU use) as Hugging Face folders.

``model=hf_llama model.path=FILE.gguf`` converts the file once into a Llama folder that
the shim then loads like any other: ``config.json`` from the file's ``llama.*`` metadata,
``model.safetensors`` dequantised to fp32 by the ``gguf`` package's own reader, and the
tokenizer (``tokenizer.json``, its own rules for BOS and EOS) through ``transformers``'
GGUF tokenizer conversion. The folder is kept in a cache keyed by the file's hash
(``$TINYSKIP_CACHE/gguf/``, default ``~/.cache/tinyskip/gguf/``), written atomically.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..atomic import make_dirs, publish_dir, temp_dir, write_json_atomic
from ..config import UserError

# GGUF tensor names (llama.cpp's) -> Hugging Face Llama's, per block and for the model.
BLOCK_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
               "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
MODEL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
               "output": "lm_head"}


# Part of the cache key: a change to the conversion makes new folders, never reuses old ones.
CONVERTER_VERSION = b"tinyskip-gguf-1"


class GGUFError(UserError):
    """A GGUF file that is not a Llama model tinyskip can read."""


def cache_root() -> Path:
    return Path(os.environ.get("TINYSKIP_CACHE") or Path.home() / ".cache" / "tinyskip") / "gguf"


def is_gguf(path: str) -> bool:
    return Path(path).expanduser().suffix.lower() == ".gguf"


def gguf_folder(path: str) -> Path:
    """The Hugging Face folder made from the GGUF file at ``path`` (converted on first use)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise GGUFError(f"model.path={path!r}: no such GGUF file")
    digest = hashlib.sha256(CONVERTER_VERSION)
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    folder = cache_root() / digest.hexdigest()[:16]
    if (folder / "model.safetensors").is_file():
        return folder
    make_dirs(folder.parent)
    tmp = temp_dir(folder.parent, f".{folder.name}-tmp-")
    try:
        _convert(file, tmp)
        publish_dir(tmp, folder)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)     # a refused or interrupted file leaves nothing
        if isinstance(e, OSError) and (folder / "model.safetensors").is_file():
            return folder                          # another process published it first
        raise
    return folder


_REQUIRED = object()


def _field(reader, key: str, default=_REQUIRED):
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise GGUFError(f"the GGUF file has no {key} in its metadata (a Llama model needs "
                            "it)")
        return default
    return field.contents()


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of a query or key projection's rows (out, in): it
    interleaves each head's two rotary halves, Hugging Face keeps them as halves."""
    out = w.shape[0]
    # (heads, hd/2, 2, in) -> (heads, 2, hd/2, in): the pairs back into two halves.
    return w.reshape(heads, out // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _convert(file: Path, out: Path) -> None:
    try:
        from gguf import GGUFReader
        from gguf.quants import dequantize
        from transformers import AutoTokenizer
    except ImportError:
        raise GGUFError("reading GGUF files needs gguf and transformers: pip install -e '.[hf]'")
    try:
        reader = GGUFReader(str(file))
    except Exception as e:        # the reader raises plain errors on a file it cannot parse
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        raise GGUFError(f"{file} is not a GGUF file ({type(e).__name__}: {reason})")
    arch = _field(reader, "general.architecture", None)
    if arch != "llama":
        raise GGUFError(f"{file}: architecture {arch!r}; tinyskip reads llama GGUF files")
    if _field(reader, "llama.rope.scaling.type", None) not in (None, "none"):
        raise GGUFError(f"{file}: RoPE scaling in a GGUF file is not supported yet")
    heads = int(_field(reader, "llama.attention.head_count"))
    kv_heads = int(_field(reader, "llama.attention.head_count_kv", heads))
    tensors = {}
    for t in reader.tensors:
        try:
            w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)   # writable copy
        except NotImplementedError:
            raise GGUFError(f"{file}: tensor {t.name} is {t.tensor_type.name}, a type the gguf "
                            "reader cannot dequantise")
        w = w.reshape(tuple(int(n) for n in reversed(t.shape.tolist())))   # (out, in)
        part, _, kind = t.name.rpartition(".")
        if part.startswith("blk."):
            _, index, op = part.split(".")
            if op not in BLOCK_NAMES:
                raise GGUFError(f"{file}: unexpected tensor {t.name!r} for a Llama model")
            if op in ("attn_q", "attn_k"):
                w = _unpermute(w, heads if op == "attn_q" else kv_heads)
            name = f"model.layers.{index}.{BLOCK_NAMES[op]}.{kind}"
        elif part in MODEL_NAMES:
            name = f"{MODEL_NAMES[part]}.{kind}"
        else:
            raise GGUFError(f"{file}: unexpected tensor {t.name!r} for a Llama model")
        tensors[name] = torch.from_numpy(np.ascontiguousarray(w))
    hidden = int(_field(reader, "llama.embedding_length"))
    vocab = tensors["model.embed_tokens.weight"].shape[0]
    write_json_atomic(out / "config.json", {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "lm_head.weight" not in tensors, "hidden_act": "silu",
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id", None),
        "torch_dtype": "float32"})
    save_file(tensors, str(out / "model.safetensors"))
    # The tokenizer as transformers reads it from the same file: its pre-tokenizer,
    # merges, special tokens and whether it adds BOS.
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    except Exception as e:       # no tokenizer in the file, or one transformers cannot build
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        raise GGUFError(f"{file}: no tokenizer transformers can read ({reason})")
    tokenizer.save_pretrained(str(out))
