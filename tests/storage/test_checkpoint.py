import os
import shutil
import stat

import pytest
import torch

from tinyskip import atomic
from tinyskip.config import UserError
from tinyskip.model.transformer import Transformer
from tinyskip.storage.checkpoint import (CheckpointError, load_model, load_train_state,
                                         resolve_checkpoint, run_folder, save_checkpoint)


@pytest.fixture
def saved(tiny_config, tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    save_checkpoint(tmp_path / "run", model, tiny_tokenizer, {"step": 1, "optimizer": {}})
    return model, tiny_tokenizer, tmp_path / "run"


def test_a_crash_between_the_swap_renames_falls_back_and_recovers(saved):
    model, tok, run = saved
    # The state a crash leaves after `checkpoint -> .checkpoint-old` and a stray temp folder.
    os.replace(run / "checkpoint", run / ".checkpoint-old")
    (run / ".checkpoint-tmp-dead").mkdir()
    assert resolve_checkpoint(run) == run / ".checkpoint-old"
    save_checkpoint(run, model, tok, {"step": 2, "optimizer": {}})
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


def test_everything_saved_is_readable_by_others_whatever_the_umask(tiny_config, tmp_path, tiny_tokenizer):
    old = os.umask(0o077)
    try:
        save_checkpoint(tmp_path / "run", Transformer(tiny_config()), tiny_tokenizer)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "run",
                                                               *(tmp_path / "run").rglob("*")]}
    assert modes == {"run": 0o755, "checkpoint": 0o755, "config.json": 0o644,
                     "model.safetensors": 0o644, "tokenizer.model": 0o644}


def test_a_save_is_durable_before_the_old_checkpoint_goes(saved, monkeypatch):
    model, tok, run = saved
    events = []
    monkeypatch.setattr(atomic, "_fsync", lambda p: events.append(("fsync", os.path.basename(p))))
    replace, rmtree = os.replace, shutil.rmtree
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(
        ("rename", os.path.basename(a), os.path.basename(b))), replace(a, b)))
    monkeypatch.setattr(shutil, "rmtree", lambda p, **kw: (events.append(
        ("delete", os.path.basename(p))), rmtree(p, **kw)))
    save_checkpoint(run, model, tok, {"step": 2, "optimizer": {}})
    names = [e[1] for e in events]
    tmp = next(e[1] for e in events if e[:1] == ("rename",) and e[2] == "checkpoint")
    files_and_tmp = {"config.json", "model.safetensors", "tokenizer.model", "train_state.pt", tmp}
    publish = events.index(("rename", tmp, "checkpoint"))
    assert files_and_tmp <= {n for e, n in zip(events[:publish], names) if e[0] == "fsync"}
    assert events[publish + 1] == ("fsync", "run")            # the parent, after the rename
    assert events[publish + 2:] == [("delete", ".checkpoint-old")]
    assert ("rename", "checkpoint", ".checkpoint-old") in events[:publish]


@pytest.mark.parametrize("run", ["../x", "/abs/x", "a/../../x", ".", ""])
def test_run_names_cannot_leave_the_checkpoint_root(run):
    with pytest.raises(CheckpointError, match="a run name must be a relative path inside "
                                              "checkpoint_root='ckpts'"):
        run_folder("ckpts", run)
    assert run_folder("ckpts", "sweep/a") == run_folder("ckpts", "sweep") / "a"


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 torn zip", b"\x80\x02 not a state"])
def test_a_corrupted_train_state_is_one_line(saved, content):
    _, _, run = saved
    (run / "checkpoint" / "train_state.pt").write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        load_train_state(run / "checkpoint")
    assert "train_state.pt is corrupted" in str(e.value) and "\n" not in str(e.value)


def test_a_non_utf8_config_is_one_line(saved):
    _, _, run = saved
    (run / "checkpoint" / "config.json").write_bytes(b'{"name": "\xff\xfe"}')
    with pytest.raises(CheckpointError, match=r"config.json is not UTF-8 text \(invalid start byte"):
        load_model(run)


def test_a_corrupted_tokenizer_is_one_line(saved):
    _, _, run = saved
    (run / "checkpoint" / "tokenizer.model").write_bytes(b"\x0a\x05garbage" * 3)
    with pytest.raises(UserError, match=r"tokenizer.model is not a SentencePiece model \("):
        load_model(run)


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(tiny_config, tmp_path, tiny_tokenizer):
    save_checkpoint(tmp_path / "run", Transformer(tiny_config(vocab_size=50)), tiny_tokenizer)
    with pytest.raises(CheckpointError, match=r"tokenizer.model has 60 tokens, more than the "
                                              r"model's vocab_size=50"):
        load_model(tmp_path / "run")
