"""Load what a decoding entry point runs: a tinyskip checkpoint or a Hugging Face Llama.

``run=NAME`` / ``checkpoint=PATH`` load a tinyskip checkpoint folder;
``model=hf_llama model.path=<folder or Hub id>`` loads Hugging Face Llama weights into
the same model class. Both come with a tokenizer exposing encode / decode / eos_id.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import load_model, resolve_checkpoint
from .config import ModelConfig
from .data import load_tokenizer
from .model import Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SentencePieceTokenizer:
    """A tinyskip checkpoint's tokenizer (trained without BOS)."""

    def __init__(self, path: Path):
        self.path = path
        self.sp = load_tokenizer(path)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i != self.sp.eos_id()])

    def eos_id(self) -> int:
        return self.sp.eos_id()


@dataclass
class Loaded:
    model: Transformer
    tokenizer: object                 # encode(str) -> ids, decode(ids) -> str, eos_id()
    source: str                       # the folder it came from
    tokenizer_file: Optional[Path]    # a SentencePiece file the data pipeline can use


def load_source(run: Optional[str], checkpoint: Optional[str], checkpoint_root: str,
                model_cfg: Optional[ModelConfig], device: torch.device,
                dtype: str = "float32") -> Loaded:
    if model_cfg is not None and model_cfg.path:
        from .hf_llama import HFTokenizer, load_hf_llama
        model, folder = load_hf_llama(model_cfg.path, device, DTYPES[dtype])
        return Loaded(model, HFTokenizer(folder, model.config), str(folder), None)
    ckpt = resolve_checkpoint(checkpoint or Path(checkpoint_root) / run)
    model, _ = load_model(ckpt, device, DTYPES[dtype])
    tok = ckpt / "tokenizer.model"
    return Loaded(model, SentencePieceTokenizer(tok), str(ckpt), tok)
