"""Calibration end to end: the file it writes, DEE reading it, and the commands chained as
users type them (run and data taken from the default run)."""

import json
import math
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from tinyskip.calibration import ltt
from tinyskip.calibration.run import calibrate
from tinyskip.cli import compose_job
from tinyskip.config import UserError
from tinyskip.decode.run import infer

SMALL = ["n_examples=8", "grid=4", "prompt_len=8", "max_new_tokens=6", "n_test=4",
         "delta=0.3", "epsilon=0.3"]


@pytest.fixture(scope="module")
def run_dir(trained_tiny, tmp_path_factory):
    """A copy of the tiny run, so calibration files do not leak into other tests."""
    dst = tmp_path_factory.mktemp("cal") / "tiny"
    shutil.copytree(trained_tiny[2], dst)
    return dst


@pytest.fixture(scope="module")
def calibrated(run_dir):
    # No data options: calibrate reads the run's own data settings from its job.json.
    return calibrate(compose_job("calibrate", [f"checkpoint={run_dir}"] + SMALL))


def test_calibration_file_holds_the_threshold_losses_and_weights_hash(calibrated, run_dir):
    saved = json.loads((run_dir / "calibration.json").read_text())
    assert saved["measure"] == "softmax" and saved["exits"] == [1, 2, 3]
    assert saved["delta"] == 0.3 and saved["epsilon"] == 0.3 and saved["split"] == "validation"
    assert saved["threshold"] is None or saved["threshold"] in saved["grid"]
    assert len(saved["losses"]) == len(saved["grid"]) and len(saved["losses"][0]) == 8
    grid = saved["grid"]
    assert grid == sorted(set(grid), reverse=True) and 0 <= grid[-1] and grid[0] <= 1
    assert 2 <= len(grid) <= 4
    assert len(saved["weights_hash"]) == 64
    assert saved["test"]["split"] == "test" and saved["test"]["n"] == 4
    assert len(saved["dssd"]["thresholds"]) == 3


def test_calibration_passes_delta_and_epsilon_in_their_own_places(run_dir, tmp_path):
    """Distinct delta and epsilon (every other test uses 0.3 for both): the file's
    threshold and p-values must be LTT's at (delta, epsilon) on the file's own grid and
    losses, and this data must tell that apart from the swapped call."""
    out = tmp_path / "cal.json"
    # n_examples=8 covers both orders: min_examples(0.4, 0.2) = 4, min_examples(0.2, 0.4) = 5.
    # No test split: only the calibration itself is under test (and it keeps the test short).
    args = [a for a in SMALL if not a.startswith(("delta=", "epsilon="))]
    calibrate(compose_job("calibrate", [f"checkpoint={run_dir}", f"out={out}", "test_split=null",
                                        "delta=0.4", "epsilon=0.2"] + args))
    saved = json.loads(out.read_text())
    assert (saved["delta"], saved["epsilon"]) == (0.4, 0.2)
    grid, losses = saved["grid"], np.array(saved["losses"])
    want = ltt.calibrate_threshold(grid, losses, 0.4, 0.2)
    assert saved["threshold"] == want["threshold"]
    assert saved["pvalues"] == pytest.approx(want["pvalues"], rel=1e-12)
    assert saved["risks"] == pytest.approx(want["risks"], rel=1e-12)
    swapped = ltt.calibrate_threshold(grid, losses, 0.2, 0.4)
    assert (swapped["threshold"], swapped["pvalues"]) != (want["threshold"], want["pvalues"])


def test_dee_uses_the_run_calibration_by_default_and_refuses_other_weights(calibrated, run_dir,
                                                                            tmp_path):
    [r] = infer(compose_job("infer", [f"checkpoint={run_dir}", "mode=dee", "prompt=The game",
                                      "max_new_tokens=5"]))
    lam = calibrated["threshold"]
    assert r["mode"].startswith(f"dee softmax>={'inf' if lam is None else f'{lam:g}'}")
    other = json.loads((run_dir / "calibration.json").read_text())
    other["weights_hash"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(UserError, match="was made for other weights"):
        infer(compose_job("infer", [f"checkpoint={run_dir}", "mode=dee", "prompt=The game",
                                    f"calibration={tmp_path / 'other.json'}"]))
    with pytest.raises(UserError, match="holds a threshold for measure='softmax'"):
        infer(compose_job("infer", [f"checkpoint={run_dir}", "mode=dee", "prompt=The game",
                                    "measure=margin"]))


def test_bench_adds_the_decoder_each_calibration_file_certifies(calibrated, run_dir, tmp_path):
    from tinyskip.analysis.bench import benchmark
    path = str(run_dir / "calibration.json")
    base = [f"checkpoint={run_dir}", "n_prompts=2", "prompt_len=8", "max_new_tokens=6",
            "draft_layer=[]", "exit_layer=[]", "out_dir=null"]
    res = benchmark(compose_job("bench", base + [f"calibration=[{path}]"]))
    full, row = res["rows"]
    lam = calibrated["threshold"]
    assert row["calibration"] == path and row["mode"].endswith(" calibrated")
    assert (row["family"], row["measure"], row["exits"]) == ("dee", "softmax", [1, 2, 3])
    assert row["threshold"] == (math.inf if lam is None else lam)
    other = json.loads((run_dir / "calibration.json").read_text())
    other["weights_hash"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(UserError, match="was made for other weights"):
        benchmark(compose_job("bench", base + [f"calibration=[{tmp_path / 'other.json'}]"]))
    with pytest.raises(UserError, match="max_new_tokens=7: calibration=.* certifies generations "
                                        "of up to 6 new tokens"):
        benchmark(compose_job("bench", base[:3] + ["max_new_tokens=7"] + base[4:]
                              + [f"calibration=[{path}]"]))


def test_a_calibration_runs_only_the_decoder_it_certifies(calibrated, run_dir):
    """Greedy, at most the calibrated length (6 new tokens here), by default exactly that:
    sampling or a longer generation under a calibration file is refused with one line."""
    def dee(*args):
        return compose_job("infer", [f"checkpoint={run_dir}", "mode=dee", "prompt=The game was",
                                     "stop_at_eos=false", *args])

    [r] = infer(dee())
    assert len(r["ids"]) == 6 and r["calibration"] == str(run_dir / "calibration.json")
    assert len(infer(dee("max_new_tokens=4"))[0]["ids"]) == 4
    with pytest.raises(UserError, match="max_new_tokens=7: calibration=.* certifies generations "
                                        "of up to 6 new tokens"):
        infer(dee("max_new_tokens=7"))
    with pytest.raises(UserError, match="temperature=0.8: a calibration file certifies greedy"):
        dee("temperature=0.8")
    # With threshold= the decoder is the user's own: any length, any temperature.
    [r] = infer(dee("threshold=0.5", "max_new_tokens=9", "temperature=0.8"))
    assert len(r["ids"]) == 9 and r["calibration"] is None


@pytest.mark.parametrize("args,message", [
    (["split=test"], "split='test': calibrate on the held-out validation split"),
    (["split=train"], "split='train': calibrate on the held-out validation split"),
    (["check_splits=5", "n_examples=6"], "need n_examples >= 8"),
    (["n_examples=3"], "n_examples=3: too few calibration examples .* need at least 4"),
    (["delta=1.5"], r"delta=1.5: must be in \(0, 1\)"),
    (["measure=bogus"], "measure='bogus': must be one of softmax"),
    (["cache=share"], "cache='share': must be one of propagate, recompute, copy"),
])
def test_bad_calibration_input_is_refused_and_writes_nothing(run_dir, tmp_path, args, message):
    out = tmp_path / "cal.json"
    with pytest.raises(UserError, match=message):
        calibrate(compose_job("calibrate", [f"checkpoint={run_dir}", f"out={out}"] + SMALL + args))
    assert not out.exists()


def cli(cwd, *args, stdin=None):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, input=stdin)


@pytest.mark.slow
def test_the_commands_chain_as_written_on_the_default_run(trained_tiny, tmp_path):
    """calibrate, infer mode=dee and infer mode=ssd draft_layer=3 k=4 with no run, data or
    prompt option: the default run, its data settings, prompts on standard input."""
    shutil.copytree(trained_tiny[2], tmp_path / "checkpoints" / "l6_d128")
    done = cli(tmp_path, "tinyskip.calibrate", *SMALL)
    assert done.returncode == 0, done.stderr[-1500:]
    # Its output is not a terminal: the grid walk still reports where it is.
    assert re.search(r"^thresholds \(softmax\): \d+/\d+, threshold [\d.e+-]+", done.stderr, re.M)
    assert (tmp_path / "checkpoints" / "l6_d128" / "calibration.json").is_file()
    # mode=dee generates the length its calibration covers unless told less.
    for args in (["mode=dee"], ["mode=ssd", "draft_layer=3", "k=4", "max_new_tokens=8"]):
        done = cli(tmp_path, "tinyskip.infer", *args,
                   stdin="The game was\n\nIn 1994 , the band\n")
        assert done.returncode == 0, done.stderr[-1500:]
        lines = done.stdout.strip().splitlines()
        assert lines[0].startswith("The game was -> ")
        assert lines[2].startswith("In 1994 , the band -> ")
        assert all(re.search(r"(tok/s|ended the text at once)", line) for line in lines[1::2])
        # What it runs under and where early exit stands on a model this small.
        cal = "under checkpoints/l6_d128/calibration.json ["
        assert all((cal in line) == (args == ["mode=dee"]) for line in lines[1::2])
        assert "fit in a CPU cache" in done.stderr


@pytest.mark.slow
def test_infer_without_any_prompt_continues_the_test_splits_openings(trained_tiny, tmp_path):
    """The bare command run from a script (standard input empty, not a terminal)."""
    from tinyskip.config import DataConfig
    from tinyskip.decode.run import opening_prompts
    from tinyskip.storage.loading import run_data_config

    shutil.copytree(trained_tiny[2], tmp_path / "checkpoints" / "l6_d128")
    done = cli(tmp_path, "tinyskip.infer", "mode=ssd", "draft_layer=3", "k=4", "max_new_tokens=4",
               stdin="")
    assert done.returncode == 0, done.stderr[-1500:]
    openings = opening_prompts(run_data_config(trained_tiny[2], DataConfig()))
    lines = done.stdout.strip().splitlines()
    assert len(openings) == 3 and len(lines) == 6
    assert all(lines[2 * i].startswith(o) for i, o in enumerate(openings))
    # Openings of 12 words at most that leave the sentence open: not a finished line.
    assert all(not o.startswith("=") and 1 < len(o.split()) <= 12 for o in openings)
    assert all(o.split()[-1][-1].isalnum() for o in openings)
    assert "test-split paragraphs" in done.stderr


def test_bench_sweeps_dee_measures_thresholds_and_cache_strategies(run_dir):
    from tinyskip.analysis.bench import benchmark
    from tinyskip.analysis.bench_report import format_table
    res = benchmark(compose_job("bench", [f"checkpoint={run_dir}", "n_prompts=2", "prompt_len=8",
                                          "max_new_tokens=6", "draft_layer=[]", "exit_layer=[]",
                                          "measure=[softmax]", "threshold=[inf,0.0]",
                                          "cache=[propagate,recompute,copy]"]))
    rows = {r["mode"]: r for r in res["rows"]}
    assert len(rows) == 7
    for cache in ("propagate", "recompute", "copy"):
        assert rows[f"dee softmax>=inf {cache}"]["agreement"] == 1.0
        assert rows[f"dee softmax>=inf {cache}"]["mean_exit"] == 4
        # every token after the first (prefill's, at exit 4) leaves at exit 1
        assert rows[f"dee softmax>=0 {cache}"]["mean_exit"] == pytest.approx((4 + 5 * 1) / 6)
    assert "matrix products as eager calls" in format_table(res)


def test_bench_dee_rows_check_the_exits_given(run_dir):
    from tinyskip.analysis.bench import benchmark
    res = benchmark(compose_job("bench", [f"checkpoint={run_dir}", "n_prompts=1", "prompt_len=8",
                                          "max_new_tokens=6", "draft_layer=[]", "exit_layer=[]",
                                          "measure=[softmax]", "threshold=[0.0]", "exits=[3]"]))
    row = {r["mode"]: r for r in res["rows"]}["dee softmax>=0 propagate exits=3"]
    # every token after the first (prefill's, at exit 4) leaves at exit 3, the one checked
    assert row["mean_exit"] == pytest.approx((4 + 5 * 3) / 6)


def test_classifier_measure_trains_the_exit_classifier_beside_the_checkpoint(run_dir, tmp_path):
    out = tmp_path / "clf-cal.json"
    r = calibrate(compose_job("calibrate", [f"checkpoint={run_dir}", "measure=classifier",
                                            f"out={out}", "test_split=null"] + SMALL))
    assert (run_dir / "exit_classifier.safetensors").is_file() and r["measure"] == "classifier"
    [g] = infer(compose_job("infer", [f"checkpoint={run_dir}", "mode=dee", "prompt=The game",
                                      f"calibration={out}", "max_new_tokens=5"]))
    assert g["mode"].startswith("dee classifier>=")


def test_dee_runs_the_decoder_the_calibration_certifies(calibrated, run_dir):
    base = [f"checkpoint={run_dir}", "mode=dee", "prompt=The game", "max_new_tokens=4"]
    [r] = infer(compose_job("infer", base))
    assert r["mode"].endswith(calibrated["cache"])              # the file's cache strategy
    for args, message in [(["cache=copy"], "cache='copy': the calibration file"),
                          (["threshold=0.5", f"calibration={run_dir / 'calibration.json'}"],
                           "not both"),
                          (["decay_tau=4"], "change the decoder the calibration file certifies")]:
        with pytest.raises(UserError, match=message):
            infer(compose_job("infer", base + args))


def test_a_hugging_face_model_is_calibrated_on_its_own_tokenizer_and_dee_reads_it(
        trained_tiny, wikitext_path, data_cache, tmp_path):
    """calibrate model=hf_llama model.path=DIR: windows from each split's text through the
    folder's tokenizer, the file beside the weights, keyed by their hash, where infer
    mode=dee on the same folder finds it."""
    from tinyskip.storage.data import load_lines
    from tinyskip.storage.hf_llama import export_run
    from tinyskip.storage.loading import load_source, split_ids

    folder = export_run(trained_tiny[2], tmp_path / "hf")
    data = [f"data.path={wikitext_path}", f"data.cache_dir={data_cache}", "data.max_rows=1000"]
    source = ["model=hf_llama", f"model.path={folder}"]
    result = calibrate(compose_job("calibrate", source + data + SMALL))
    assert result["path"] == str(folder / "calibration.json")
    job = compose_job("calibrate", source + data)
    loaded = load_source(None, None, "checkpoints", job.model, torch.device("cpu"))
    saved = json.loads((folder / "calibration.json").read_text())
    assert saved["weights_hash"] == loaded.weights_hash()
    # The windows are the folder's tokenizer's reading of the joined text.
    ids = split_ids(load_lines(job.data)[0], loaded.tokenizer, ["validation"])["validation"]
    text = " ".join(line.strip() for line in load_lines(job.data)[0]["validation"] if line.strip())
    assert ids.tolist() == loaded.tokenizer.encode(text)
    caches = [json.loads(f.read_text()) for f in (folder / ".calibration-cache").iterdir()]
    prompts = [e["prompt"] for c in caches if json.loads(c["key"])["split"] == "validation"
               for e in c["examples"]]
    assert len(prompts) == 8
    starts = {tuple(ids[i:i + 8].tolist()) for i in range(0, len(ids) - 8, 14)}
    assert all(tuple(p) in starts for p in prompts)
    rows = infer(compose_job("infer", source + data + ["mode=dee", "prompt=The game was"]))
    assert rows[0]["calibration"] == str(folder / "calibration.json")
