"""The entry points as users run them: outputs, files written, one-line errors."""

import json
import math
import re
import subprocess
import sys

import pytest
import torch

from tinyskip.analysis.evaluation import evaluate
from tinyskip.cli import compose_job
from tinyskip.config import UserError
from tinyskip.decode import generate
from tinyskip.decode.run import infer


@pytest.fixture
def cli(repo):
    """``python -m ARGS`` from the project's folder: (returncode, stdout, stderr)."""
    def run(*args):
        return subprocess.run([sys.executable, "-m", *args], cwd=repo, capture_output=True,
                              text=True, timeout=120)
    return run


@pytest.fixture(scope="module")
def run_args(trained_tiny, wikitext_path, data_cache):
    _, _, run_dir = trained_tiny
    return [f"checkpoint={run_dir}", f"data.path={wikitext_path}", f"data.cache_dir={data_cache}",
            "data.max_rows=1000", "data.vocab_size=300"]


def test_infer_writes_ids_text_and_statistics(cli, run_args, tmp_path):
    out = tmp_path / "gen.json"
    done = cli("tinyskip.infer", *run_args, "mode=ssd", "draft_layer=2", "k=3",
               'prompt="The game was"', "max_new_tokens=12", f"out={out}")
    assert done.returncode == 0, done.stderr[-1500:]
    assert "acceptance" in done.stdout and "tok/s" in done.stdout
    [result] = json.loads(out.read_text())
    assert result["mode"] == "ssd E=2 k=3" and 1 <= len(result["ids"]) <= 12
    assert result["stats"]["new_tokens"] == len(result["ids"])
    assert result["text"] and "prefill_s" in result["stats"]


def test_modes_agree_through_the_entry_point(run_args, trained_tiny, tmp_path):
    model, corpus, _ = trained_tiny
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The game was\n\nIn 1994 , the band\n")
    base = run_args + [f"prompts_file={prompts}", "max_new_tokens=20"]
    full = infer(compose_job("infer", base))
    ssd = infer(compose_job("infer", base + ["mode=ssd", "draft_layer=3", "k=2",
                                             "draft_vocab=100"]))
    static = infer(compose_job("infer", base + ["mode=static", "exit_layer=2"]))
    assert len(full) == 2
    assert [r["ids"] for r in ssd] == [r["ids"] for r in full]
    # A real early exit (2 of 4 blocks): the exit-2 model's own greedy output, not full's.
    exit2 = [generate(model, torch.tensor([r["prompt_ids"]]), 20, exit_layer=2,
                      eos_id=corpus.eos_id).tokens[0] for r in full]
    assert [r["ids"] for r in static] == exit2 != [r["ids"] for r in full]
    assert all(r["stats"]["layers_per_token"] == 2 for r in static)
    # batch_size=2: the two prompts (of different lengths) decode together, the same ids.
    for extra in ([], ["mode=ssd", "draft_layer=3", "k=2", "draft_vocab=100"]):
        batched = infer(compose_job("infer", base + extra + ["batch_size=2"]))
        assert [r["ids"] for r in batched] == [r["ids"] for r in full]
        assert [r["batch"] for r in batched] == [{"rows": 2, "row": 0}, {"rows": 2, "row": 1}]


def test_infer_with_choose_del_equals_full_and_shows_its_choices(run_args, capsys):
    from tinyskip.decode.run import stats_line
    base = run_args + ['prompt="The game was"', "max_new_tokens=20"]
    full = infer(compose_job("infer", base))
    [r] = infer(compose_job("infer", base + ["mode=ssd", "choose=del", "ssd_exits=[1,2,3]"]))
    assert r["ids"] == full[0]["ids"] and r["mode"] == "ssd del exits=1,2,3 k=4"
    assert "rounds by exit {E=" in stats_line(r) and "by drafts [" in stats_line(r)


def test_infer_on_the_exported_hugging_face_folder_matches(run_args, trained_tiny, tmp_path):
    pytest.importorskip("transformers")
    from tinyskip.storage.hf_llama import export_run
    folder = export_run(trained_tiny[2], tmp_path / "hf")
    args = ['prompt=The game was', "max_new_tokens=15"]
    ours = infer(compose_job("infer", run_args + args))
    hf = infer(compose_job("infer", [a for a in run_args if not a.startswith("checkpoint")]
                           + args + ["model=hf_llama", f"model.path={folder}"]))
    assert hf[0]["ids"] == ours[0]["ids"] and hf[0]["prompt_ids"] == ours[0]["prompt_ids"]


@pytest.mark.parametrize("args,message", [
    (["mode=ssd", "draft_layer=9"], "draft_layer=9: must be in 1..4"),
    (["mode=ssd", "draft_layer=2", "k=0"], "k=0: must be >= 1"),
    (["mode=static", "exit_layer=0"], "exit_layer=0: must be in 1..4"),
    (["mode=beam"], r"mode=beam: no such option \(available: dee, full, ssd, static\)"),
    (["prompt="], "the prompt is empty"),
])
def test_bad_infer_input_is_one_clear_error(run_args, args, message):
    base = [a for a in run_args] + ["prompt=hello"]
    with pytest.raises(UserError, match=message):
        infer(compose_job("infer", base + args))


def test_cli_errors_are_one_line_with_exit_status_2(cli, run_args, tmp_path):
    done = cli("tinyskip.infer", f"checkpoint={tmp_path / 'none'}", "prompt=hi")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: no checkpoint at {tmp_path / 'none'} (expected {tmp_path / 'none'}/checkpoint/"
        "config.json; train one with python -m tinyskip.train run=<name>)"]


def test_corrupted_checkpoint_is_one_clear_error(trained_tiny, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(trained_tiny[2] / "checkpoint", bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="model.safetensors is unreadable"):
        infer(compose_job("infer", [f"checkpoint={bad}", "prompt=hi"]))


def test_evaluate_reports_every_exit(run_args, trained_tiny):
    res = evaluate(compose_job("evaluate", run_args + ["split=test", "max_batches=3"]))
    assert len(res["word_ppl"]) == 4 and res["loss"][-1] < res["loss"][0]
    # 3 batches score a prefix of the split, so they stand for that share of its words:
    # ppl = exp(total NLL / (words * scored / predictable tokens)).
    predictable = trained_tiny[1].tokens["test"].size - 1
    assert res["seq_len"] == 32 and res["tokens"] == 3 * 16 * 32 < predictable
    share = res["words"] * res["tokens"] / predictable
    for loss, ppl in zip(res["loss"], res["word_ppl"]):
        assert ppl == pytest.approx(math.exp(loss * res["tokens"] / share), rel=1e-9)


def test_evaluate_reads_a_hugging_face_model_through_its_own_tokenizer(run_args, trained_tiny,
                                                                      tmp_path):
    """evaluate model=hf_llama model.path=DIR: the same weights as the run, so the same
    exits' quality, on the text as the folder's tokenizer reads it (split_ids)."""
    pytest.importorskip("transformers")
    from tinyskip.analysis.perplexity import exit_perplexities
    from tinyskip.storage.data import load_lines
    from tinyskip.storage.hf_llama import export_run
    from tinyskip.storage.loading import load_source, split_ids

    folder = export_run(trained_tiny[2], tmp_path / "hf")
    data = [a for a in run_args if not a.startswith("checkpoint")]
    job = compose_job("evaluate", data + ["model=hf_llama", f"model.path={folder}",
                                          "split=test", "max_batches=2", "seq_len=32"])
    res = evaluate(job)
    loaded = load_source(None, None, "checkpoints", job.model, torch.device("cpu"))
    lines = load_lines(job.data)[0]
    ids = split_ids(lines, loaded.tokenizer, ["test"])["test"]
    words = sum(len(line.split()) for line in lines["test"])
    ref = exit_perplexities(loaded.model, ids, words, 32, max_batches=2)
    assert res["loss"] == ref["loss"] and res["confidence"] == ref["confidence"]
    assert res["words"] == words and len(res["loss"]) == 4


def test_evaluate_in_a_log_reports_its_batches_then_the_table(cli, run_args):
    done = cli("tinyskip.evaluate", *run_args, "split=test", "max_batches=2")
    assert done.returncode == 0, done.stderr[-1500:]
    assert re.search(r"^eval: 2/2, \d+:\d\d elapsed$", done.stderr, re.M), done.stderr[-1500:]
    assert done.stdout.splitlines()[1].split() == ["exit", "loss/token", "word", "ppl", "top-1",
                                                   "agree", "p(last", "top)", "confidence"]
