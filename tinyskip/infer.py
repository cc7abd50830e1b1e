"""``python -m tinyskip.infer mode=full|static|ssd|dee [run=NAME] [prompt="..."]``.

The model is rebuilt from the checkpoint's own config (not from conf/model/), the data
settings come from the run unless given, and without ``prompt=`` / ``prompts_file=``
prompts are read from standard input (one per line; interactive on a terminal). The work
is ``tinyskip/decode/run.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .atomic import write_json_atomic
from .cli import entry_point
from .decode.run import generations, shown_text, stats_line
from .jobs import InferJob


@entry_point("infer")
def main(job: InferJob) -> None:
    results = []
    for r in generations(job):
        results.append(r)
        print(shown_text(r))
        if r["batch"]["row"] + 1 == r["batch"]["rows"]:     # a batch's statistics: once, last
            under = f" under {r['calibration']}" if r["calibration"] else ""
            print(f"{r['mode']}{under} {stats_line(r)}", flush=True)
        if r["note"]:
            print(r["note"], file=sys.stderr)
    if job.out:
        write_json_atomic(Path(job.out).resolve(), results)


if __name__ == "__main__":
    main()
