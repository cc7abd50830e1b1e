"""The notebooks: committed with the outputs of the real runs, and executed here top to
bottom (papermill, the notebook's own kernel) against a tiny run, evaluation,
calibration and benchmark made in the test, so a notebook that breaks fails CI."""

import os
import subprocess
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
papermill = pytest.importorskip("papermill")

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = {"training_curves", "exit_quality", "ablation", "decoding_benchmark", "dee_calibration",
            "real_model"}


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


@pytest.mark.slow
def test_one_command_makes_inputs_for_every_notebook_and_runs_them(repo, wikitext_path, tmp_path):
    """``notebooks/tiny_inputs.sh``, as the README gives it: tiny runs, evaluations,
    calibrations and a benchmark made by the commands themselves, then every notebook
    executed top to bottom against them, each drawing its plots."""
    done = subprocess.run(["bash", str(repo / "notebooks" / "tiny_inputs.sh"), wikitext_path,
                           str(tmp_path)], cwd=repo, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    for path in NOTEBOOKS:
        nb = nbformat.read(tmp_path / "executed" / path.name, as_version=4)
        images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
                  if o.get("data", {}).get("image/png")]
        assert images, f"{path.stem} drew nothing"
