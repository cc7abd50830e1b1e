import json
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest
import torch

from tinyskip.cli import compose_job
from tinyskip.config import UserError
from tinyskip.storage.checkpoint import CheckpointError, load_model
from tinyskip.training.losses import layerdrop_probs
from tinyskip.training.optim import cosine_lr
from tinyskip.training.trainer import train


@pytest.fixture
def overrides(tiny_train_overrides, wikitext_path, data_cache, tmp_path):
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
    assert not (tmp_path / "r" / "tensorboard").exists()      # train.tensorboard is off


def test_tensorboard_scalars_are_what_metrics_jsonl_and_the_schedules_hold(
        overrides, tmp_path, tensorboard_scalars, val_tags):
    job = compose_job("train", overrides(max_steps=20, eval_every=10, log_every=5,
                                         tensorboard=True) + ["train=layerskip"])
    result = train(job, progress=False)
    rows = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    tags = tensorboard_scalars(tmp_path / "r" / "tensorboard")
    train_tags = ["loss", "lr", "tokens_per_s", "layerdrop_max", "layerdrop_mean"]
    val = val_tags(rows)
    assert len(val) == 4 * 4 and set(tags) == set(val) | {f"train/{t}" for t in train_tags}
    assert {tag: tags[tag] for tag in val} == val
    tc, logged = job.train, [5, 10, 15, 20]
    assert tags["train/loss"] == [(s, pytest.approx(statistics.fmean(result.losses[s - 5:s]),
                                                    rel=1e-6)) for s in logged]
    # Step s is logged after s steps: its lr and LayerDrop rate are those of step index s - 1.
    assert tags["train/lr"] == [(s, pytest.approx(cosine_lr(tc, s - 1), rel=1e-6)) for s in logged]
    probs = [layerdrop_probs(tc, 4, s - 1) for s in logged]
    assert tags["train/layerdrop_max"] == [(s, pytest.approx(max(p), rel=1e-6))
                                           for s, p in zip(logged, probs)]
    assert tags["train/layerdrop_mean"] == [(s, pytest.approx(sum(p) / 4, rel=1e-6))
                                            for s, p in zip(logged, probs)]
    assert tags["train/layerdrop_max"][-1][1] > 0        # layerskip's rate rises over the run
    assert tags["train/tokens_per_s"][-1][1] == pytest.approx(rows[-1]["tokens_per_s"], rel=1e-6)


def test_a_resumed_run_hides_what_the_interrupted_run_logged_past_its_checkpoint(
        overrides, tmp_path, monkeypatch, tensorboard_scalars, val_tags):
    from tinyskip.training import trainer

    kw = dict(max_steps=20, eval_every=5, save_every=10, log_every=5, tensorboard=True)
    real_batch = trainer.get_batch

    def crash_at_step_15(*args):
        if args[4] == 15:
            raise RuntimeError("killed")
        return real_batch(*args)

    monkeypatch.setattr(trainer, "get_batch", crash_at_step_15)
    with pytest.raises(RuntimeError, match="killed"):
        train(compose_job("train", overrides(**kw)), progress=False)
    monkeypatch.undo()
    # Its evaluation at step 15 reached the event file; the checkpoint is step 10's.
    assert [s for s, _ in tensorboard_scalars(tmp_path / "r" / "tensorboard")["val/loss/exit_4"]] \
        == [5, 10, 15]
    # (TensorBoard reads a folder's event files in name order, which counts whole seconds.)
    time.sleep(1.1)
    train(compose_job("train", overrides(resume=True, **kw)), progress=False)
    assert len(list((tmp_path / "r" / "tensorboard").iterdir())) == 2
    rows = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    tags = tensorboard_scalars(tmp_path / "r" / "tensorboard")
    val = val_tags(rows)
    assert {tag: tags[tag] for tag in val} == val           # step 15 once: the resumed run's
    assert [s for s, _ in tags["train/loss"]] == [5, 10, 15, 20]


def test_a_missing_tensorboard_package_is_one_line_before_anything_runs(overrides, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)    # import fails
    with pytest.raises(UserError) as e:
        train(compose_job("train", overrides(tensorboard=True)), progress=False)
    assert str(e.value) == ("train.tensorboard=true needs the tensorboard package: "
                            "pip install -e '.[tensorboard]'")
    assert not (tmp_path / "r").exists()


def test_a_compile_fallback_is_recorded_in_the_run_metrics(overrides, tmp_path, no_cxx):
    with pytest.warns(UserWarning, match="torch.compile is unavailable here"):
        train(compose_job("train", overrides(max_steps=4, eval_every=4, compile=True)),
              progress=False)
    [row] = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert row["compiled_blocks"] is False


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


def test_a_fallback_checkpoint_alone_also_blocks_a_fresh_run(overrides, tmp_path):
    train(compose_job("train", overrides(max_steps=10, eval_every=5)), progress=False)
    run = tmp_path / "r"
    # What a crash between the swap renames leaves: only the fallback folder.
    os.replace(run / "checkpoint", run / ".checkpoint-old")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(CheckpointError, match=r"already holds a checkpoint \(.checkpoint-old\)"):
        train(compose_job("train", overrides(max_steps=10)), progress=False)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert (run / ".checkpoint-old" / "model.safetensors").is_file()


def test_a_run_resumed_from_its_fallback_checkpoint_saves_again_and_again(overrides, tmp_path,
                                                                        monkeypatch):
    """Resumed from .checkpoint-old (what a crash mid-swap leaves), the run's first save
    removes that folder: its later saves still find the tokenizer."""
    from tinyskip.training import trainer

    save = trainer.save_checkpoint

    def crash_after_step_5(run_dir, model, tokenizer_file, state, *args):
        save(run_dir, model, tokenizer_file, state, *args)
        if state["step"] == 5:
            raise KeyboardInterrupt          # the run dies right after its step-5 save

    monkeypatch.setattr(trainer, "save_checkpoint", crash_after_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(compose_job("train", overrides(max_steps=20, eval_every=5, save_every=5)),
              progress=False)
    monkeypatch.setattr(trainer, "save_checkpoint", save)
    run = tmp_path / "r"
    os.replace(run / "checkpoint", run / ".checkpoint-old")
    train(compose_job("train", overrides(max_steps=20, eval_every=5, save_every=5, resume=True)),
          progress=False)                      # saves at 10, 15 and 20
    state = torch.load(run / "checkpoint" / "train_state.pt", weights_only=True)
    assert state["step"] == 20 and not (run / ".checkpoint-old").exists()


def test_resume_refuses_another_recipe_and_accepts_runtime_changes(overrides, tmp_path):
    kw = dict(max_steps=10, eval_every=5)
    train(compose_job("train", overrides(**kw)), progress=False)
    refused = [
        (overrides(resume=True, **{**kw, "lr": 0.02}), r"train.lr: 0.01 -> 0.02;"),
        (overrides(resume=True, **{**kw, "seed": 7}), r"train.seed: 1337 -> 7;"),
        (overrides(resume=True, **kw) + ["train=plain"],
         r"train.preset: 'layerskip' -> 'plain'; train.layerdrop_p_max: 0.2 -> 0.0;"),
        (overrides(resume=True, **kw) + ["data.max_rows=900"], r"data.max_rows: 1000 -> 900;"),
        (overrides(resume=True, **{**kw, "max_steps": 20}),
         r"train.max_steps: 10 -> 20 \(the cosine LR schedule, LayerDrop's S\(t\) and the "
         r"gradual curriculum are functions of step / max_steps\);"),
    ]
    for args, message in refused:
        with pytest.raises(CheckpointError, match="train.resume=true with another recipe than "
                                                  ".*job.json: " + message):
            train(compose_job("train", args), progress=False)
    # Evaluation, logging, saving and device settings do not change what is computed.
    runtime = {**kw, "eval_every": 3, "save_every": 4, "log_every": 1, "eval_batches": 1,
               "device": "cpu"}
    assert train(compose_job("train", overrides(resume=True, **runtime)), progress=False).step == 10


def test_bf16_autocast_by_default_only_where_the_device_multiplies_bf16_natively(overrides,
                                                                              tmp_path):
    """train.bf16 left null (the default): the run trains, and records, bf16 autocast where
    ATen hands bf16 products to oneDNN, fp32 where it would fall back to a scalar loop (200
    times slower than fp32 on an AVX2-only AMD EPYC). A given value is kept."""
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    job_file = tmp_path / "r" / "job.json"
    train(compose_job("train", overrides(max_steps=2, eval_every=2, bf16="null")), progress=False)
    assert json.loads(job_file.read_text())["train"]["bf16"] is native
    train(compose_job("train", overrides(max_steps=2, eval_every=2, bf16=not native,
                                         overwrite=True)), progress=False)
    assert json.loads(job_file.read_text())["train"]["bf16"] is (not native)


def test_resume_compares_a_renamed_key_under_its_new_name(overrides, tmp_path):
    """A run started before ``train.exit_scale`` became ``train.exit_weighting`` still has
    its recipe checked on that key."""
    kw = dict(max_steps=10, eval_every=5)
    train(compose_job("train", overrides(**kw)), progress=False)
    job_file = tmp_path / "r" / "job.json"
    saved = json.loads(job_file.read_text())
    del saved["train"]["exit_weighting"]
    saved["train"]["exit_scale"] = "linear"
    job_file.write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match="train.exit_weighting: 'linear' -> 'layerskip'"):
        train(compose_job("train", overrides(resume=True, **kw)), progress=False)


def test_a_torn_last_metrics_line_is_dropped_with_one_warning(overrides, tmp_path):
    kw = dict(max_steps=10, eval_every=5)
    train(compose_job("train", overrides(**kw)), progress=False)
    metrics = tmp_path / "r" / "metrics.jsonl"
    whole = metrics.read_text()
    metrics.write_text(whole + '{"step": 15, "tokens": 12')          # killed mid-append
    with pytest.warns(UserWarning, match=r"metrics.jsonl: dropped 1 line\(s\) that do not parse"):
        train(compose_job("train", overrides(resume=True, **kw)), progress=False)
    assert metrics.read_text() == whole


@pytest.mark.parametrize("run", ["../escaped", "/tmp/tinyskip-abs-run"])
def test_a_run_name_cannot_leave_the_checkpoint_root(overrides, tmp_path, run):
    with pytest.raises(CheckpointError, match=f"run='{run}': a run name must be a relative path"):
        train(compose_job("train", overrides(run)), progress=False)
    assert not (tmp_path.parent / "escaped").exists() and not os.path.exists(run)


def test_resume_without_a_checkpoint_is_one_clear_error(overrides):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        train(compose_job("train", overrides(resume=True)), progress=False)


def test_ddp_on_gpus_gives_each_rank_its_device_and_nccl(monkeypatch):
    """No GPU here: the calls torchrun's ranks make are recorded instead."""
    import torch.distributed as dist

    from tinyskip.training import trainer
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(backend))
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(f"cuda:{i}"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert trainer.init_distributed(torch.device("cuda")) == (1, 2)
    assert calls == ["cuda:1", "nccl"]
    calls.clear()
    trainer.init_distributed(torch.device("cpu"))      # train.device=cpu on a GPU machine
    assert calls == ["gloo"]


@pytest.mark.slow
def test_killed_run_resumes_with_the_uninterrupted_losses(repo, overrides, tmp_path):
    kw = dict(max_steps=60, save_every=10, eval_every=20, eval_batches=0)
    reference = train(compose_job("train", overrides("ref", **kw) + ["train=layerskip"]),
                      progress=False)
    proc = subprocess.Popen([sys.executable, "-m", "tinyskip.train", *overrides("killed", **kw),
                             "train=layerskip"], cwd=repo, stdout=subprocess.DEVNULL,
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
def test_ddp_with_two_processes_matches_one_process(repo, overrides, tmp_path, tensorboard_scalars,
                                                   val_tags):
    kw = dict(max_steps=12, eval_every=4, eval_batches=2, save_every=12, device="cpu",
              tensorboard=True)
    job = compose_job("train", overrides("one", **kw))
    # The default preset is the LayerSkip recipe: the ranks must agree on LayerDrop draws
    # and on the early-exit losses, not only on a plain last-layer loss.
    assert job.train.layerdrop_p_max > 0 and job.train.exit_weighting != "none"
    single = train(job, progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tinyskip.train", *overrides("ddp", **kw)]
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(l) for l in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(l) for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8, 12]
    for a, b in zip(rows, ref):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
    assert single.step == 12
    # Rank 0 alone writes TensorBoard's file (the evaluations are its own).
    assert len(list((tmp_path / "ddp" / "tensorboard").iterdir())) == 1
    tags, val = tensorboard_scalars(tmp_path / "ddp" / "tensorboard"), val_tags(rows)
    assert {tag: tags[tag] for tag in val} == val
