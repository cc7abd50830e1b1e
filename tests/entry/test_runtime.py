"""Progress reports when the output is not a terminal: plain lines at a steady pace."""

import re
import subprocess
import sys

import pytest
import torch

from tinyskip.config import ConfigError
from tinyskip.runtime import LineProgress, check_runs, progress_bar


def test_line_progress_reports_step_rate_postfix_and_eta(capsys):
    bar = LineProgress(total=5, desc="train x", every=0.0)
    bar.set_postfix(loss="2.345")
    bar.update(2)
    bar.write("step 2: val loss 3.1")
    bar.update(3)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"train x: 2/5, loss 2\.345, 0:00 elapsed, ETA 0:00", lines[0])
    assert lines[1] == "step 2: val loss 3.1"
    assert re.fullmatch(r"train x: 5/5, loss 2\.345, 0:00 elapsed", lines[2])   # done: no ETA
    assert len(lines) == 3                     # close() does not repeat the last report


def test_line_progress_keeps_quiet_between_reports_and_always_reports_the_end(capsys):
    for _ in LineProgress(range(1000), desc="grid", every=3600.0):
        pass
    assert capsys.readouterr().err.splitlines() == ["grid: 1000/1000, 0:00 elapsed"]


def test_progress_bar_is_plain_lines_off_a_terminal(capsys):
    assert isinstance(progress_bar(range(3), desc="x"), LineProgress)   # pytest's stderr: no tty


def test_a_training_run_in_a_log_reports_its_progress(repo, tiny_train_overrides, wikitext_path,
                                                      data_cache, tmp_path):
    """``python -m tinyskip.train`` with its output in a file: the steps and the evaluations
    appear as lines, not only the final summary."""
    args = tiny_train_overrides(wikitext_path, data_cache, tmp_path, "r", max_steps=6,
                                eval_every=3, save_every=6)
    done = subprocess.run([sys.executable, "-m", "tinyskip.train", *args], cwd=repo,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"^train r: 6/6, loss \d", done.stderr, re.M), done.stderr[-2000:]
    assert re.search(r"^step 3: val loss by exit", done.stderr, re.M)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_a_dtype_the_device_cannot_compute_in_is_refused_in_one_line():
    """Tried for real: a small product in ComplexHalf, which the CPU has no kernel for."""
    with pytest.raises(ConfigError) as e:
        check_runs(torch.device("cpu"), torch.complex32, "complex32")
    msg = str(e.value)
    assert msg.startswith("dtype=complex32: this machine's cpu cannot compute in it (") and \
        "\n" not in msg
    for dtype in (torch.float32, torch.bfloat16):      # what loading checks before it loads
        check_runs(torch.device("cpu"), dtype, str(dtype))
