"""``python -m tinyskip.train_bench model=l6_d128``: the plain and layerskip presets'
training steps timed side by side, with model FLOP utilisation against a peak measured in
the run. The work is ``tinyskip/training/bench.py``.
"""

from __future__ import annotations

from .atomic import write_json_atomic
from .cli import entry_point
from .bench_jobs import TrainBenchJob
from .training.bench import bench_training, format_table


@entry_point("train_bench")
def main(job: TrainBenchJob) -> None:
    result = bench_training(job)
    print(format_table(result))
    if job.out:
        write_json_atomic(job.out, result)


if __name__ == "__main__":
    main()
