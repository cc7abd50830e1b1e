"""``train.parallel=fsdp``: FSDP2 over two gloo ranks on the CPU trains as one process
does, a run killed mid-way resumes exactly, and its shards reshard onto one process."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from tinyskip.cli import compose_job
from tinyskip.config import TrainConfig
from tinyskip.model.transformer import Transformer
from tinyskip.storage.checkpoint import CheckpointError
from tinyskip.storage.sharded_checkpoint import load_shards
from tinyskip.training.optim import make_optimizer
from tinyskip.training.sharding import shard
from tinyskip.training.trainer import ExitObjective, train, train_step

# 12 steps, an evaluation and a checkpoint every 4: the kill comes after the step-4 save.
# LayerDrop at 0.7 on every block: a rank's 4 rows all skip a block the other rank runs
# (p = 0.24 per block and step), and all 8 rows skip one together (p = 0.06).
KW = dict(max_steps=12, eval_every=4, eval_batches=2, save_every=4, device="cpu",
          layerdrop_p_max=0.7, layerdrop_depth="uniform", layerdrop_time="constant")
KILL_AT = 4


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def torchrun(repo, nproc: int, *args: str) -> subprocess.CompletedProcess:
    """torchrun in a session of its own: ranks stuck in a collective (one rank calling a
    sharded block that another skips) are killed with it when the time is up."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", *args]
    proc = subprocess.Popen(cmd, cwd=repo, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun ran past 120 s (ranks waiting on each other?): {err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture
def group_of_one(tmp_path, monkeypatch):
    """A process group of one in this process, as ``torchrun --nproc_per_node=1`` makes."""
    for key, value in dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="1").items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(repo, tiny_train_overrides, wikitext_path, data_cache, tmp_path_factory):
    """One process; two fsdp ranks; two fsdp ranks SIGKILLed after the step-4 checkpoint
    (the layerskip preset: LayerDrop and early exits). (root, overrides(run, **train))."""
    root = tmp_path_factory.mktemp("fsdp")

    def overrides(run, **train):
        return tiny_train_overrides(wikitext_path, data_cache, root, run, **{**KW, **train})

    train(compose_job("train", overrides("one")), progress=False)
    done = torchrun(repo, 2, "-m", "tinyskip.train", *overrides("fsdp", parallel="fsdp"))
    assert done.returncode == 0, done.stderr[-3000:]
    killed = torchrun(repo, 2, "tests/training/killed_run.py", str(KILL_AT),
                      *overrides("killed", parallel="fsdp"))
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr, killed.stderr[-3000:]
    for layout in ("fsdp", "ddp"):     # for the resumes on one process
        shutil.copytree(root / "killed", root / f"killed-{layout}")
    return root, overrides


def numbers(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


@pytest.mark.slow
def test_two_fsdp_ranks_train_as_one_process_does(runs):
    root, _ = runs
    ref, rows = metrics(root / "one"), metrics(root / "fsdp")
    assert [r["step"] for r in rows] == [4, 8, 12]
    for a, b in zip(rows, ref):
        # (float32 sums in another order: about 1e-7 apart here)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    ckpt = root / "fsdp" / "checkpoint"
    manifest = json.loads((ckpt / "sharded.json").read_text())
    assert manifest == {"world_size": 2, "files": [".metadata", "__0_0.distcp", "__1_0.distcp"]}
    assert "optimizer" not in torch.load(ckpt / "train_state.pt", weights_only=True)
    # The consolidated weights every other entry point loads: whole, tied stored once.
    whole, one = load_file(ckpt / "model.safetensors"), load_file(root / "one" / "checkpoint" /
                                                                   "model.safetensors")
    assert whole.keys() == one.keys() and "lm_head.weight" not in whole
    for name, value in whole.items():
        torch.testing.assert_close(value, one[name], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_killed_fsdp_run_resumes_exactly(repo, runs):
    root, overrides = runs
    state = torch.load(root / "killed" / "checkpoint" / "train_state.pt", weights_only=True)
    assert state["step"] == KILL_AT and [r["step"] for r in metrics(root / "killed")] == [4]
    done = torchrun(repo, 2, "-m", "tinyskip.train",
                    *overrides("killed", parallel="fsdp", resume=True))
    assert done.returncode == 0, done.stderr[-3000:]
    assert numbers(metrics(root / "killed")) == numbers(metrics(root / "fsdp"))
    weights = "checkpoint/model.safetensors"
    assert (root / "killed" / weights).read_bytes() == (root / "fsdp" / weights).read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_two_ranks_shards_resume_on_one_process(runs, parallel, request):
    """Onto a group of one (fsdp: one shard of everything) or one plain process (whole
    weights): the numbers of the two-rank run go on, within float32 sums' order."""
    root, overrides = runs
    run = f"killed-{parallel}"
    if parallel == "fsdp":
        request.getfixturevalue("group_of_one")
    result = train(compose_job("train", overrides(run, parallel=parallel, resume=True)),
                   progress=False)
    assert result.step == 12 and len(result.losses) == 12 - KILL_AT
    rows, ref = metrics(root / run), metrics(root / "fsdp")
    assert [r["step"] for r in rows] == [4, 8, 12]
    for a, b in zip(rows[1:], ref[1:]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    saved = json.loads((root / run / "checkpoint" / "sharded.json").read_text()) \
        if parallel == "fsdp" else None
    assert saved is None or saved["world_size"] == 1
    assert (root / run / "checkpoint" / "sharded.json").exists() == (parallel == "fsdp")


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_a_sharded_step_reads_the_head_whole_and_steps_as_one_process(tiny_config, tied, bf16,
                                                                     group_of_one):
    """LayerDrop on, the head tied or not: the loss reads lm_head inside the sharded
    root's forward (a sharded read would mix DTensors with tensors and fail). Under
    train.bf16, bf16 products on a residual stream that stays fp32, as one process's
    autocast does (the blocks gather bf16 weights; only the norms' gains then round)."""
    tc = TrainConfig(exit_weighting="layerskip", e_scale=0.2, layerdrop_p_max=0.5,
                     layerdrop_depth="uniform", bf16=bf16, batch_size=4, parallel="fsdp")
    x, y = torch.randint(0, 97, (4, 16)), torch.randint(0, 97, (4, 16))
    losses, inputs, weights = {}, {}, {}
    for sharded in (False, True):
        torch.manual_seed(0)
        model = Transformer(tiny_config(tie_word_embeddings=tied)).train()
        model.layers[0].register_forward_pre_hook(
            lambda m, args: inputs.setdefault(sharded, args[0].dtype) and None)
        model.layers[0].mlp.up_proj.register_forward_pre_hook(
            lambda m, args: weights.setdefault(sharded, m.weight.dtype) and None)
        objective = ExitObjective(model, tc)
        if sharded:
            shard(objective, model.layers, tc)
        opt = make_optimizer(model, tc)
        losses[sharded] = [train_step(objective, opt, tc, x, y, step).loss.item()
                           for step in range(3)]
    assert losses[True] == pytest.approx(losses[False], rel=2e-3 if bf16 else 1e-6)
    assert inputs == {False: torch.float32, True: torch.float32}
    assert weights[True] == (torch.bfloat16 if bf16 else torch.float32)    # (gathered so)


def test_a_rank_whose_rows_all_skip_a_block_still_calls_it(tiny_model):
    """A sharded block's call is a collective: called on no rows, it changes nothing."""
    rows = []
    tiny_model.layers[1].register_forward_hook(lambda m, args, out: rows.append(len(args[0])))
    x, draws = torch.randint(0, 97, (2, 8)), torch.ones(2, 4)
    draws[:, 1] = 0.0                       # both rows skip block 1 (p = 0.5)
    tiny_model.train()
    alone = tiny_model(x, [4], [0.5] * 4, draws)
    assert rows == []
    called = tiny_model(x, [4], [0.5] * 4, draws, called=[True] * 4)
    assert rows == [0] and torch.equal(called, alone)


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _string(text: str) -> bytes:
    """A pickle SHORT_BINUNICODE opcode."""
    return b"\x8c" + bytes([len(text)]) + text.encode()


# Protocol 4 resolves dotted names through a module: DCP's metadata module imports os.
DOTTED = (b"\x80\x04" + _string("torch.distributed.checkpoint.metadata") + _string("os.system")
          + b"\x93" + _string("touch pwned") + b"\x85R.")


@pytest.mark.parametrize("payload, refused", [
    (lambda: __import__("pickle").dumps(RunsCode()), "posix.system is not allowed"),
    (lambda: DOTTED, "torch.distributed.checkpoint.metadata.os.system is not allowed"),
    (lambda: __import__("pickle").dumps({"not": "metadata"}), "a dict, not DCP's Metadata"),
], ids=["global", "dotted", "not-metadata"])
def test_shard_metadata_that_would_run_code_is_refused_unread(tmp_path, tiny_model, monkeypatch,
                                                              payload, refused):
    """DCP's .metadata is a pickle: only the classes its metadata is made of come out of it,
    by exact name, and a refusal is one CheckpointError line (not DCP's own exception)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sharded").mkdir()
    (tmp_path / "sharded" / ".metadata").write_bytes(payload())
    with pytest.raises(CheckpointError, match="not shard metadata DCP wrote "
                                              rf"\({re.escape(refused)}\)"):
        load_shards(tmp_path, tiny_model, make_optimizer(tiny_model, TrainConfig()))
    assert not (tmp_path / "pwned").exists()


def test_a_torn_shard_is_one_checkpoint_error(tmp_path, tiny_model):
    """DCP raises its failures as a BaseException carrying each rank's: one line here."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    opt = make_optimizer(tiny_model, TrainConfig())
    model_state, optim_state = get_state_dict(tiny_model, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp_path / "sharded")
    load_shards(tmp_path, tiny_model, opt)                      # whole, it loads
    shard = next((tmp_path / "sharded").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"its shards do not load into this run \("):
        load_shards(tmp_path, tiny_model, opt)


def test_under_torchrun_a_refusal_is_said_once(repo, tmp_path):
    """Every rank meets the same bad input; rank 0 alone prints the line (torchrun then
    reports its children's exit in its own words)."""
    done = torchrun(repo, 2, "-m", "tinyskip.train", "model=l4_d64", "train.batch_size=3",
                    "train.parallel=fsdp", f"checkpoint_root={tmp_path}")
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert lines == ["error: train.batch_size=3 must be divisible by the 2 data-parallel "
                     "processes"]
    assert not any(tmp_path.iterdir())
