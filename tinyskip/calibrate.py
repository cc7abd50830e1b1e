"""``python -m tinyskip.calibrate [run=NAME] [measure=softmax] [delta=0.1] [epsilon=0.05]``.

Calibrates the DEE threshold of a run with CALM's guarantee, checks it on a held-out split,
and writes ``<run>/calibration.json``, which ``infer mode=dee`` then uses by default. The
work is ``tinyskip/calibration/run.py``.
"""

from __future__ import annotations

from .calibration.run import calibrate, report
from .cli import entry_point
from .jobs import CalibrateJob


@entry_point("calibrate")
def main(job: CalibrateJob) -> None:
    print(report(calibrate(job)))


if __name__ == "__main__":
    main()
