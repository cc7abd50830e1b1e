"""The notebooks: committed with the outputs of the real runs, and executed here top to
bottom (papermill, the notebook's own kernel) against a tiny run, evaluation,
calibration and benchmark made in the test, so a notebook that breaks fails CI."""

import json
import shutil
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
papermill = pytest.importorskip("papermill")

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = {"training_curves", "exit_quality", "ablation", "decoding_benchmark", "dee_calibration"}


def test_every_analysis_has_its_notebook():
    assert {p.stem for p in NOTEBOOKS} == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_with_the_outputs_of_a_clean_run(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []), "first code cell: the parameters"
    # Run top to bottom in one go (execution counts 1, 2, ...), no cell failed.
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert any(o.get("data", {}).get("image/png") for c in code for o in c.outputs), \
        "a notebook committed without its plots"


@pytest.fixture(scope="module")
def artefacts(trained_tiny, wikitext_path, data_cache, tmp_path_factory):
    """A tiny run with an evaluation, two calibration files and a benchmark sweep."""
    from tinyskip.analysis.bench import benchmark
    from tinyskip.analysis.bench_report import write_results
    from tinyskip.calibration.run import calibrate
    from tinyskip.cli import compose_job
    from tinyskip.evaluate import evaluate

    root = tmp_path_factory.mktemp("nb")
    run = root / "checkpoints" / "tiny"
    shutil.copytree(trained_tiny[2], run)
    data = [f"data.path={wikitext_path}", f"data.cache_dir={data_cache}", "data.max_rows=1000",
            "data.vocab_size=300"]
    ev = evaluate(compose_job("evaluate", [f"checkpoint={run}", "split=test", "max_batches=2"] + data))
    (run / "eval_test.json").write_text(json.dumps(ev))
    small = [f"checkpoint={run}", "n_examples=8", "grid=4", "prompt_len=8", "max_new_tokens=6",
             "delta=0.3", "epsilon=0.3"]
    cal, splits = root / "cal.json", root / "cal-splits.json"
    calibrate(compose_job("calibrate", small + ["n_test=4", f"out={cal}"]))
    calibrate(compose_job("calibrate", small + ["check_splits=4", "test_split=null",
                                                f"out={splits}"]))
    res = benchmark(compose_job("bench", [f"checkpoint={run}", "n_prompts=2", "prompt_len=8",
                                          "max_new_tokens=6", "ssd_layers=[1,2]", "ssd_k=[2,3]",
                                          "draft_vocab=100", "dee_measures=[softmax]",
                                          "dee_thresholds=[0.9,0.5]", f"dee_calibrations=[{cal}]",
                                          "out_dir=null"] + data))
    bench = write_results(res, root / "bench" / "tiny" / "2026-01-01_00-00-00")
    return {"run": run, "cal": cal, "splits": splits, "bench": bench}


def parameters(stem: str, a: dict) -> dict:
    ckpts, run = str(a["run"].parent), a["run"].name
    return {
        "training_curves": {"CHECKPOINTS": ckpts, "RUNS": [run, run]},
        "exit_quality": {"EVALS": {"tiny": str(a["run"] / "eval_test.json")}},
        "ablation": {"CHECKPOINTS": ckpts, "VARIANTS": {"plain": run, "layerskip": run}},
        # A run's folder under logs/bench (its newest sweep is read) and a sweep's own.
        "decoding_benchmark": {"RESULTS": [str(a["bench"].parent), str(a["bench"])]},
        "dee_calibration": {"CALIBRATIONS": [str(a["cal"]), str(a["splits"])],
                            "RESULTS": str(a["bench"])},
    }[stem]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom_on_a_tiny_run(path, artefacts, tmp_path):
    out = tmp_path / path.name
    papermill.execute_notebook(str(path), str(out), parameters=parameters(path.stem, artefacts),
                               cwd=str(NOTEBOOK_DIR), kernel_name="python3", progress_bar=False)
    nb = nbformat.read(out, as_version=4)
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.get("data", {}).get("image/png")]
    assert images, "the notebook drew nothing"
