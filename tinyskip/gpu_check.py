"""``python -m tinyskip.gpu_check``: on a CUDA machine, the GPU tests and a short benchmark
(an 8B-shaped Llama in bf16 decoding eager and with CUDA graphs, SSD on it, FSDP training
steps on every GPU present), printed as one table; about ten minutes on one H100. Without
CUDA it says it skipped and exits 0. The work is ``tinyskip/analysis/gpu_check.py``.
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from .analysis.gpu_check import format_table, run_checks
from .atomic import write_json_atomic
from .bench_jobs import GpuCheckJob
from .cli import entry_point


@entry_point("gpu_check")
def main(job: GpuCheckJob) -> None:
    if job.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: skipped, no CUDA device here (device=cpu runs the same checks "
              "on the CPU)")
        return
    rows = run_checks(job)
    print(format_table(rows))
    if job.out:
        write_json_atomic(job.out, [dataclasses.asdict(r) for r in rows])
    if not all(r.ok for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
