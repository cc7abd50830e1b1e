import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tinyskip.checkpoint import CheckpointError, load_model
from tinyskip.cli import compose_job
from tinyskip.trainer import train

from conftest import tiny_train_overrides

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def overrides(wikitext_path, data_cache, tmp_path):
    def make(run="r", **train_kw):
        return tiny_train_overrides(wikitext_path, data_cache, tmp_path, run, **train_kw)
    return make


def test_tiny_layerskip_run_lowers_the_loss_and_writes_metrics(overrides, tmp_path):
    job = compose_job("train", overrides(max_steps=200, eval_every=100) + ["train=layerskip"])
    result = train(job, progress=False)
    assert sum(result.losses[-20:]) / 20 < sum(result.losses[:20]) / 20 - 0.3
    rows = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [100, 200]
    assert len(rows[-1]["val_word_ppl"]) == 4 and rows[-1]["tokens_per_s"] > 0
    assert rows[-1]["val_loss"][-1] < rows[0]["val_loss"][-1]
    model, ckpt = load_model(tmp_path / "r")
    assert ckpt == tmp_path / "r" / "checkpoint" and model.config.vocab_size == 300


def test_existing_run_is_never_silently_overwritten(overrides):
    train(compose_job("train", overrides(max_steps=10)), progress=False)
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        train(compose_job("train", overrides(max_steps=10)), progress=False)
    train(compose_job("train", overrides(max_steps=10, overwrite=True)), progress=False)


def test_resume_with_a_different_model_config_is_refused(overrides, tmp_path):
    train(compose_job("train", overrides(max_steps=10)), progress=False)
    before = (tmp_path / "r" / "checkpoint" / "model.safetensors").read_bytes()
    job = compose_job("train", overrides(max_steps=20, resume=True) + ["model.num_hidden_layers=3"])
    with pytest.raises(CheckpointError, match=r"differs from the checkpoint .*num_hidden_layers"):
        train(job, progress=False)
    assert (tmp_path / "r" / "checkpoint" / "model.safetensors").read_bytes() == before


def test_resume_without_a_checkpoint_is_one_clear_error(overrides):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        train(compose_job("train", overrides(resume=True)), progress=False)


@pytest.mark.slow
def test_killed_run_resumes_with_the_uninterrupted_losses(overrides, tmp_path):
    kw = dict(max_steps=60, save_every=10, eval_every=20, eval_batches=0)
    reference = train(compose_job("train", overrides("ref", **kw) + ["train=layerskip"]),
                      progress=False)
    proc = subprocess.Popen([sys.executable, "-m", "tinyskip.train", *overrides("killed", **kw),
                             "train=layerskip"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = tmp_path / "killed" / "checkpoint" / "train_state.pt"
    deadline = time.time() + 600
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = torch.load(state, weights_only=True)["step"]
    assert 0 < step < 60, "the run should have been killed mid-way"
    resumed = train(compose_job("train", overrides("killed", resume=True, **kw)
                                + ["train=layerskip"]), progress=False)
    assert resumed.step == 60
    assert resumed.losses == reference.losses[step:]
    ref_state = load_model(tmp_path / "ref")[0].state_dict()
    for name, value in load_model(tmp_path / "killed")[0].state_dict().items():
        assert torch.equal(value, ref_state[name]), name


@pytest.mark.slow
def test_ddp_with_two_processes_matches_one_process(overrides, tmp_path):
    kw = dict(max_steps=12, eval_every=4, eval_batches=2, save_every=12)
    single = train(compose_job("train", overrides("one", **kw)), progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_port=29517", "-m", "tinyskip.train", *overrides("ddp", **kw)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(l) for l in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(l) for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8, 12]
    for a, b in zip(rows, ref):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
    assert single.step == 12
