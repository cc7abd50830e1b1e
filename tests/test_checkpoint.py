import os

import pytest
import torch

from tinyskip.checkpoint import CheckpointError, load_model, resolve_checkpoint, save_checkpoint
from tinyskip.model import Transformer

from conftest import tiny_config


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    tok = tmp_path / "sp.model"
    tok.write_bytes(b"tokenizer")
    save_checkpoint(tmp_path / "run", model, tok, {"step": 1})
    return model, tok, tmp_path / "run"


def test_a_crash_between_the_swap_renames_falls_back_and_recovers(saved):
    model, tok, run = saved
    # The state a crash leaves after `checkpoint -> .checkpoint-old` and a stray temp folder.
    os.replace(run / "checkpoint", run / ".checkpoint-old")
    (run / ".checkpoint-tmp-dead").mkdir()
    assert resolve_checkpoint(run) == run / ".checkpoint-old"
    save_checkpoint(run, model, tok, {"step": 2})
    assert resolve_checkpoint(run) == run / "checkpoint"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint"]
    loaded, _ = load_model(run)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_an_incomplete_checkpoint_is_one_clear_error(saved):
    _, _, run = saved
    (run / "checkpoint" / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match=r"is incomplete: missing \['tokenizer.model'\]"):
        resolve_checkpoint(run)
