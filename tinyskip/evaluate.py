"""``python -m tinyskip.evaluate run=NAME split=test [out=FILE.json]``: per-exit perplexity.
The work is ``tinyskip/analysis/evaluation.py``."""

from __future__ import annotations

from pathlib import Path

from .analysis.evaluation import evaluate, report
from .atomic import write_json_atomic
from .cli import entry_point
from .jobs import EvaluateJob


@entry_point("evaluate")
def main(job: EvaluateJob) -> None:
    result = evaluate(job)
    print(report(result))
    if job.out:
        write_json_atomic(Path(job.out).resolve(), result)


if __name__ == "__main__":
    main()
