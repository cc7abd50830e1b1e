"""``python -m tinyskip.bench run=NAME``: a sweep of decoding modes in one process, on the
same prompts, with ``full`` in the same run. The work is ``tinyskip/analysis/bench.py``;
its results go to ``out_dir`` (see ``tinyskip/analysis/bench_report.py``).
"""

from __future__ import annotations

from pathlib import Path

from .analysis.bench import benchmark
from .analysis.bench_report import format_table, write_results
from .cli import entry_point
from .bench_jobs import BenchJob
from .tb_log import require_tensorboard


@entry_point("bench")
def main(job: BenchJob) -> None:
    if job.tensorboard:             # before the sweep, not after it
        require_tensorboard("tensorboard")
    res = benchmark(job)
    print(format_table(res))
    if job.out_dir:
        out = write_results(res, Path(job.out_dir), job.tensorboard)
        print(f"results: {out}/results.{{json,csv,md}} and {out}/pareto.png"
              + (f", scalars in {out}/tensorboard/" if job.tensorboard else ""))


if __name__ == "__main__":
    main()
