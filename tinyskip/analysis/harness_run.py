"""The job behind ``python -m tinyskip.harness``: lm-evaluation-harness tasks (the local
ones of ``harness_tasks.py`` or any the harness ships) scored with its own
``simple_evaluate`` through a tinyskip model in one decoding mode, and the table it prints."""

from __future__ import annotations

import difflib
import json
import logging

from ..config import UserError, first_line
from ..jobs import HarnessJob
from ..storage.loading import run_data_config
from .harness_tasks import TASKS, task_configs


def task_manager(job: HarnessJob):
    """The harness's task manager, with every task the job names known to it (checked
    before a model is loaded). Its index of the ~15k tasks it ships takes seconds to
    build, so it is built only when a task is not one of the local ones."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_defaults=any(name not in TASKS for name in job.tasks))
    for name in job.tasks:
        if name not in TASKS and name not in manager.all_tasks:
            near = difflib.get_close_matches(name, [*TASKS, *manager.all_tasks], n=1)
            raise UserError(f"tasks: {name!r} is not a harness task ("
                            + (f"did you mean {near[0]!r}? " if near else "")
                            + f"offline tasks: {', '.join(TASKS)})")
    return manager


def build_tasks(job: HarnessJob, data, manager) -> list:
    """The tasks a job names, built with their data loaded (local ones reading ``data``):
    each name's top-level object, a group whole (so that its own scores, averages over
    its tasks, are kept) and a tag as its tasks. ``mode=dee`` is refused here on
    likelihood tasks, before any is scored."""
    from .harness_lm import LIKELIHOOD

    local = task_configs(data)
    built, leaves = [], {}
    for name in job.tasks:
        try:
            loaded = manager.load([local.get(name, name)])
        except Exception as e:  # the data of a task: Hub download, missing split, bad folder
            raise UserError(f"tasks: cannot load the data of {name!r} ({type(e).__name__}: "
                            f"{first_line(e)})")
        leaves.update(loaded["tasks"])
        top = loaded["groups"].get(name) or loaded["tasks"].get(name)
        built += [top] if top is not None else list(loaded["tasks"].values())
    scored = sorted(n for n, task in leaves.items() if task.OUTPUT_TYPE in LIKELIHOOD)
    if scored and job.mode == "dee":
        raise UserError(f"mode=dee cannot drive {', '.join(scored)}: likelihood tasks are "
                        "scored teacher-forced, where DEE's exits are not DEE's (run them with "
                        "mode=full or mode=static exit_layer=E; DEE runs generate_until tasks)")
    return built


def run_harness(job: HarnessJob) -> dict:
    """Scores of each task, the throughput of the mode, and what ran (JSON-ready)."""
    try:
        from lm_eval import simple_evaluate
    except ImportError:
        raise UserError("tinyskip.harness needs lm-evaluation-harness: pip install -e '.[eval]'")
    from .harness_lm import TinyskipLM

    logging.getLogger("lm_eval").setLevel(logging.WARNING)   # its INFO lines drown the table
    manager = task_manager(job)
    lm = TinyskipLM(job)
    tasks = build_tasks(job, run_data_config(lm.loaded.run_dir, job.data), manager)
    out = simple_evaluate(model=lm, tasks=tasks, num_fewshot=job.num_fewshot,
                          limit=job.limit, bootstrap_iters=job.bootstrap_iters,
                          gen_kwargs=job.gen_kwargs, log_samples=False, task_manager=manager,
                          random_seed=job.seed, numpy_random_seed=job.seed,
                          torch_random_seed=job.seed, fewshot_random_seed=job.seed)
    return {"source": str(lm.loaded.exits or lm.loaded.source), "mode": lm.spec.label,
            "results": json.loads(json.dumps(out["results"], default=str)),
            "n_samples": out.get("n-samples", {}), "throughput": lm.throughput()}


def report(result: dict) -> str:
    """One row per task and metric, then the mode's throughput."""
    lines = [f"{result['source']}, {result['mode']}",
             f"{'task':<30} {'metric':<18} {'value':>10} {'stderr':>9}"]
    for task, metrics in result["results"].items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if metric in ("alias", "name", "sample_len") or metric.endswith("_stderr") or \
                    not isinstance(value, (int, float)):
                continue
            err = metrics.get(f"{metric}_stderr,{filt}")
            err = f"{err:>9.4f}" if isinstance(err, (int, float)) else f"{'':>9}"
            lines.append(f"{task:<30} {metric:<18} {value:>10.4f} {err}")
    t = result["throughput"]
    parts = []
    if t["scored_tokens"]:
        parts.append(f"scored {t['scored_tokens']} tokens at {t['scoring_tokens_per_s']:.0f} tok/s")
    if t["new_tokens"]:
        parts.append(f"generated {t['new_tokens']} tokens at "
                     f"{t['generation_tokens_per_s']:.1f} tok/s (compiling not counted)")
    if t["calibration"]:
        parts.append(f"under {t['calibration']}")
    return "\n".join(lines + ([", ".join(parts)] if parts else []))
