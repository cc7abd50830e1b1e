"""Run many entry-point invocations from one Python start-up (tests/test_bad_input.py).

``python entry_runner.py CASES.json RESULTS.json``: each case ``{"entry", "args", "cwd"}``
(and optionally ``"env"``, variables added to its environment)
runs in a forked child exactly as ``python -m tinyskip.<entry> <args>`` would (the module
runs as ``__main__`` with ``sys.argv`` set, in ``cwd``, with stdin empty), so its exit
status, stdout and stderr are its own. Only the interpreter start-up and the imports are
shared, which makes dozens of cases cost seconds instead of minutes on a busy machine.

Around every case the files under ``cwd``, the ``watch`` folders and the run folders'
root (``$TINYSKIP_LOGS``) are fingerprinted, and the paths the case created, changed or
removed are reported: ``touched`` outside the run folders, ``logged`` inside them (a job
that runs leaves a run folder there; a refused one leaves nothing).
"""

from __future__ import annotations

import hashlib
import json
import os
import runpy
import sys
import tempfile
import traceback

# What every case needs, imported once before forking (no threads are started by it).
import datasets  # noqa: F401
import torch  # noqa: F401

import tinyskip.bench  # noqa: F401
import tinyskip.calibrate  # noqa: F401
import tinyskip.evaluate  # noqa: F401
import tinyskip.export  # noqa: F401
import tinyskip.infer  # noqa: F401
import tinyskip.train  # noqa: F401


def fingerprint(roots: list[str]) -> dict[str, str]:
    files = {}
    for root in roots:
        for folder, dirs, names in os.walk(root):
            files[folder] = "dir"
            for name in names:
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    files[path] = hashlib.sha256(f.read()).hexdigest()
    return files


def run_case(case: dict) -> dict:
    out, err = (tempfile.TemporaryFile() for _ in range(2))
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.chdir(case["cwd"])
            os.environ.update(case.get("env", {}))     # e.g. what torchrun gives a rank
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.argv = ["-m", *case["args"]]
            # As under `python -m`: the entry module runs as __main__ only, never imported.
            sys.modules.pop(f"tinyskip.{case['entry']}", None)
            runpy.run_module(f"tinyskip.{case['entry']}", run_name="__main__", alter_sys=True)
        except SystemExit as e:                # what the interpreter does with it
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    out.seek(0)
    err.seek(0)
    return {"rc": os.waitstatus_to_exitcode(status), "stdout": out.read().decode(errors="replace"),
            "stderr": err.read().decode(errors="replace")}


def main(cases_file: str, results_file: str) -> None:
    results = []
    for case in json.loads(open(cases_file).read()):
        roots, logs = [case["cwd"], *case.get("watch", [])], os.environ["TINYSKIP_LOGS"]
        before = fingerprint(roots + [logs])
        result = run_case(case)
        after = fingerprint(roots + [logs])
        changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
        result["touched"] = [p for p in changed if not p.startswith(logs)]
        result["logged"] = [p for p in changed if p.startswith(logs)]
        results.append(result)
    with open(results_file, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
