"""``python -m tinyskip.harness [run=NAME] [tasks=[...]] [mode=...] [limit=N]``:
lm-evaluation-harness tasks scored through one decoding mode, with the tokens/s the mode
took. The work is ``tinyskip/analysis/harness_run.py``; the model adapter (registered
with the harness as ``tinyskip``) is ``tinyskip/analysis/harness_lm.py``."""

from __future__ import annotations

from pathlib import Path

from .analysis.harness_run import report, run_harness
from .atomic import write_json_atomic
from .cli import entry_point
from .jobs import HarnessJob


@entry_point("harness")
def main(job: HarnessJob) -> None:
    result = run_harness(job)
    print(report(result))
    if job.out:
        write_json_atomic(Path(job.out).resolve(), result)


if __name__ == "__main__":
    main()
