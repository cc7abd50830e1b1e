import os
from pathlib import Path

import pytest
import torch

from tinyskip.config import ModelConfig
from tinyskip.model import Transformer

# The offline WikiText-2 copy beside the checkout (see README: never copied into the repo).
WIKITEXT = Path(os.environ.get("TINYSKIP_WIKITEXT",
                               Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext"))

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(name="tiny", vocab_size=97, hidden_size=32, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                  max_position_embeddings=64)
    fields.update(overrides)
    return ModelConfig(**fields)


@pytest.fixture
def tiny_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config()).eval()


@pytest.fixture(scope="session")
def wikitext_path() -> str:
    if not (WIKITEXT / "wikitext-2-raw-v1").is_dir():
        pytest.skip(f"local WikiText-2 copy not found at {WIKITEXT} (set TINYSKIP_WIKITEXT)")
    return str(WIKITEXT)
