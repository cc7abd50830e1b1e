"""Continual training of a pretrained Hugging Face Llama (training/continual.py): a tiny
random Llama folder written here is trained further with the LayerSkip recipe, and the
run is then used by name as any run is."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tinyskip.cli import compose_job
from tinyskip.config import ConfigError
from tinyskip.storage.checkpoint import CheckpointError
from tinyskip.storage.data import get_batch, load_lines
from tinyskip.storage.hf_llama import HFTokenizer, config_from_hf, load_hf_llama
from tinyskip.storage.loading import load_source
from tinyskip.training import trainer
from tinyskip.training.trainer import train


@pytest.fixture(scope="module")
def pretrained(hf_llama_folder, tmp_path_factory):
    """tie -> (folder, the transformers model it holds): a tokenizer.json that puts BOS
    in front, as most Hub Llamas' do."""
    root = tmp_path_factory.mktemp("pretrained")
    return {tie: (root / f"tie{tie}", hf_llama_folder(root / f"tie{tie}", bos_template=True,
                                                      tie=tie))
            for tie in (False, True)}


@pytest.fixture
def args(wikitext_path, data_cache):
    def make(folder, root, run, **train_kw):
        tc = {"max_steps": 6, "batch_size": 4, "seq_len": 32, "eval_every": 6, "eval_batches": 1,
              "save_every": 2, "bf16": False, "compile": False, **train_kw}
        return ([f"data.path={wikitext_path}", f"data.cache_dir={data_cache}",
                 "data.max_rows=1000", "model=hf_llama", f"model.path={folder}",
                 f"checkpoint_root={root}", f"run={run}", "train=layerskip"]
                + [f"train.{k}={v}" for k, v in tc.items()])
    return make


@pytest.mark.parametrize("tie", [False, True])
def test_the_trainer_starts_from_the_pretrained_weights_and_reads_its_tokenizer(
        pretrained, args, tmp_path, tie):
    folder, ref = pretrained[tie]
    job = compose_job("train", args(folder, tmp_path, "c"))
    ran, model, corpus, state, _ = trainer._prepare_run(job, tmp_path / "c", None, False)
    assert state is None and ran.model.num_hidden_layers == 3 and ran.model.hidden_size == 64
    ids = torch.randint(3, 120, (2, 24))
    with torch.no_grad():
        ours = model(ids)[0]
        assert torch.equal(ours, load_hf_llama(str(folder))[0](ids)[0])
        torch.testing.assert_close(ours, ref(ids).logits, atol=1e-5, rtol=1e-5)
    assert (model.lm_head.weight is model.embed_tokens.weight) == tie
    assert next(model.parameters()).dtype == torch.float32
    # Each split as the model reads it: through its own tokenizer, BOS in front.
    tok = HFTokenizer(folder, ran.model)
    lines = load_lines(job.data)[0]["train"]
    assert corpus.tokens["train"].tolist() == tok.encode(
        " ".join(line.strip() for line in lines if line.strip()))
    assert corpus.tokens["train"][0] == 1


@pytest.mark.parametrize("tie", [False, True])
def test_a_few_steps_train_every_weight_and_lower_the_loss(pretrained, args, tmp_path, tie):
    folder, _ = pretrained[tie]
    job = compose_job("train", args(folder, tmp_path, "c", max_steps=10, save_every=10,
                                    eval_every=10))
    result = train(job, progress=False)
    before = load_hf_llama(str(folder))[0]
    loaded = load_source("c", None, str(tmp_path), None, torch.device("cpu"))
    after = loaded.model
    assert loaded.fmt == "hf" and loaded.run_dir == tmp_path / "c"
    for name, value in after.state_dict().items():
        assert not torch.equal(value, before.state_dict()[name]), name
    assert (after.lm_head.weight is after.embed_tokens.weight) == tie
    ckpt = tmp_path / "c" / "checkpoint"
    assert json.loads((ckpt / "config.json").read_text())["tie_word_embeddings"] == tie
    source = json.loads((ckpt / "source.json").read_text())
    assert source["path"] == str(folder.resolve()) and source["weights_hash"] == \
        load_source(None, None, "", job.model, torch.device("cpu")).backbone_hash()
    # A fixed batch of the training stream scores lower at the last exit.
    text = " ".join(line.strip() for line in load_lines(job.data)[0]["train"] if line.strip())
    x, y = get_batch(np.asarray(loaded.tokenizer.encode(text)), 8, 32, 0, 999)
    with torch.no_grad():
        losses = [F.cross_entropy(m(x)[0].flatten(0, 1), y.flatten()).item()
                  for m in (before, after)]
    assert losses[1] < losses[0] - 0.05, losses
    rows = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10] and len(rows[0]["val_loss"]) == 3
    assert result.step == 10
    saved = json.loads((tmp_path / "c" / "job.json").read_text())["model"]
    assert (saved["num_hidden_layers"], saved["tie_word_embeddings"], saved["path"]) == \
        (3, tie, str(folder))


@pytest.mark.slow
def test_a_killed_run_resumes_to_byte_identical_weights(repo, pretrained, args, tmp_path):
    folder, _ = pretrained[True]
    reference = train(compose_job("train", args(folder, tmp_path, "ref")), progress=False)
    done = subprocess.run([sys.executable, str(repo / "tests" / "training" / "killed_run.py"),
                           "2", *args(folder, tmp_path, "killed")], cwd=repo,
                          env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == -9, done.stderr[-3000:]
    state = torch.load(tmp_path / "killed" / "checkpoint" / "train_state.pt", weights_only=True)
    assert state["step"] == 2
    resumed = train(compose_job("train", args(folder, tmp_path, "killed", resume=True)),
                    progress=False)
    assert resumed.step == 6 and resumed.losses == reference.losses[2:]
    for name in ("model.safetensors", "config.json", "tokenizer.json", "source.json"):
        assert (tmp_path / "killed" / "checkpoint" / name).read_bytes() == \
            (tmp_path / "ref" / "checkpoint" / name).read_bytes(), name


@pytest.fixture(scope="module")
def run(pretrained, wikitext_path, data_cache, tmp_path_factory):
    """A finished continual run of the untied model (a low rate: its greedy text stays as
    varied as the random model's, where the tied one repeats its last token)."""
    root = tmp_path_factory.mktemp("continual")
    folder, _ = pretrained[False]
    job = compose_job("train", [
        f"data.path={wikitext_path}", f"data.cache_dir={data_cache}", "data.max_rows=1000",
        "model=hf_llama", f"model.path={folder}", f"checkpoint_root={root}", "run=c",
        "train=layerskip", "train.max_steps=2", "train.batch_size=4", "train.seq_len=32",
        "train.eval_batches=1", "train.lr=1e-4", "train.bf16=false", "train.compile=false"])
    train(job, progress=False)
    return root, folder, job


def test_the_run_decodes_by_name_with_the_pretrained_tokenizer(run):
    from tinyskip.decode.run import infer

    root, folder, _ = run
    base = ["run=c", f"checkpoint_root={root}", "prompt=the game was played",
            "max_new_tokens=16", "stop_at_eos=false"]
    [full] = infer(compose_job("infer", base))
    [ssd] = infer(compose_job("infer", base + ["mode=ssd", "draft_layer=1", "k=4"]))
    tok = HFTokenizer(folder, config_from_hf(json.loads((folder / "config.json").read_text())))
    assert full["prompt_ids"] == tok.encode("the game was played") and full["prompt_ids"][0] == 1
    assert len(set(full["ids"])) > 3, full["ids"]      # a test of SSD's verification
    assert ssd["ids"] == full["ids"] and ssd["prompt_ids"] == full["prompt_ids"]
    assert ssd["stats"]["drafted"] > 0


def test_evaluate_export_and_bench_take_the_run_by_name(run, tmp_path):
    from tinyskip.analysis.bench import benchmark
    from tinyskip.analysis.evaluation import evaluate
    from tinyskip.analysis.export import export_job
    from tinyskip.storage.loading import split_ids

    root, folder, job = run
    ev = evaluate(compose_job("evaluate", ["run=c", f"checkpoint_root={root}",
                                           "split=validation"]))
    lines = load_lines(job.data)[0]
    loaded = load_source("c", None, str(root), None, torch.device("cpu"))
    assert ev["tokens"] == split_ids(lines, loaded.tokenizer, ["validation"])["validation"].size - 1
    assert ev["seq_len"] == 32                  # the run's own windows, from its job.json
    out = tmp_path / "export"
    export_job(compose_job("export", ["run=c", f"checkpoint_root={root}", f"out={out}",
                                      "evaluate=false"]))
    exported = load_source(None, None, "", compose_job("infer", [
        "model=hf_llama", f"model.path={out}"]).model, torch.device("cpu"))
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value, exported.model.state_dict()[name]), name
    assert (out / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    res = benchmark(compose_job("bench", ["run=c", f"checkpoint_root={root}", "n_prompts=1",
                                          "prompt_len=8", "max_new_tokens=6", "draft_layer=[1]",
                                          "k=[2]", "exit_layer=[1]", "out_dir=null"]))
    assert [r["mode"] for r in res["rows"]] == ["full", "static E=1", "ssd E=1 k=2"]
    assert res["rows"][2]["agreement"] == 1.0


def test_resuming_from_other_weights_or_another_origin_is_refused(run, pretrained, args):
    root, folder, _ = run
    other, _ = pretrained[True]
    with pytest.raises(CheckpointError, match="train.resume=true with other weights than"):
        train(compose_job("train", args(other, root, "c", resume=True)), progress=False)
    scratch = [a for a in args(folder, root, "c", resume=True) if not a.startswith("model")]
    with pytest.raises(CheckpointError, match="continues the pretrained model"):
        train(compose_job("train", scratch), progress=False)
    with pytest.raises(ConfigError, match="model.hidden_size=256: a continual run's model"):
        train(compose_job("train", args(folder, root, "d") + ["model.hidden_size=256"]),
              progress=False)
