"""The calibration job behind ``python -m tinyskip.calibrate``: a DEE threshold with CALM's
guarantee (the threshold walk in ``walk.py``, the statistics in ``ltt.py``), checked on a
held-out split and written to ``<run>/calibration.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

from ..atomic import make_dirs, write_json_atomic
from ..config import DEEConfig, UserError
from ..decode.steps import StopIds
from ..jobs import CalibrateJob
from ..model.exit_classifier import (FILE as CLASSIFIER_FILE, ExitClassifier, exit_examples,
                                     load_exit_classifier, save_exit_classifier,
                                     train_exit_classifier)
from ..runtime import pick_device, progress_bar
from ..storage.loading import corpus_of, default_calibration, load_source, run_data_config
from . import ltt
from .walk import (Example, decode_full, dee_losses, exit_confidences, sample_windows,
                   threshold_grid, walk_grid)


def cached_examples(model, run_dir: Path, key: dict, windows, max_new_tokens: int,
                    eos: StopIds) -> list[Example]:
    """The full model's greedy outputs, decoded once per checkpoint and settings and kept
    in ``<run>/.calibration-cache/``."""
    folder = run_dir / ".calibration-cache"
    name = json.dumps(key, sort_keys=True)
    path = folder / f"{hashlib.sha256(name.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == name:
            return [Example(**e) for e in saved["examples"]]
    examples, _ = decode_full(model, progress_bar(windows, desc="full outputs"), max_new_tokens,
                               eos)
    make_dirs(folder)
    write_json_atomic(path, {"key": name, "examples": [dataclasses.asdict(e) for e in examples]})
    return examples


def exit_classifier(model, run_dir: Path, train_tokens, exits: list[int], whash: str,
                    seed: int) -> ExitClassifier:
    """The run's exit classifier for these exits, trained (on the train split, model
    frozen) and saved beside the checkpoint when missing or made for other weights."""
    path = run_dir / CLASSIFIER_FILE
    try:
        clf = load_exit_classifier(path, whash)
        if set(exits) <= set(clf.exits):
            return clf
    except UserError:
        pass                                   # missing, unreadable or stale: train anew
    states, labels = exit_examples(model, train_tokens, exits, n_windows=64, seq_len=128,
                                   seed=seed)
    clf = train_exit_classifier(states, labels, exits, whash)
    save_exit_classifier(clf, path)
    return clf


def calibrate(job: CalibrateJob) -> dict:
    device = pick_device(job.device)
    loaded = load_source(job.run, job.checkpoint, job.checkpoint_root, job.model, device,
                         quantize=job.quantize)
    # A Hugging Face model's results (the calibration, its cache) go beside its weights.
    run_dir, model = loaded.run_dir or Path(loaded.source), loaded.model
    out = Path(job.out) if job.out else default_calibration(loaded)
    L = model.num_layers
    base = job.decoder()
    base.validate(L)
    need = ltt.min_examples(job.delta, job.epsilon)
    if job.n_examples < need:
        raise UserError(f"n_examples={job.n_examples}: too few calibration examples for any "
                        f"guarantee at delta={job.delta}, epsilon={job.epsilon}: need at least {need}")
    if job.check_splits and job.n_examples // 2 < need:
        raise UserError(f"check_splits={job.check_splits} calibrates on halves of n_examples="
                        f"{job.n_examples}: need n_examples >= {2 * need} at delta={job.delta}, "
                        f"epsilon={job.epsilon}")
    data = run_data_config(loaded.run_dir, job.data)
    streams = corpus_of(loaded, data)
    tokens, eos = streams.tokens, streams.stop
    whash = loaded.weights_hash()

    def examples_of(split: str, n: int, seed: int):
        windows = sample_windows(tokens[split], n, job.prompt_len, job.max_new_tokens, seed)
        key = {"weights": whash, "split": split, "n": n, "prompt_len": job.prompt_len,
               "max_new_tokens": job.max_new_tokens, "seed": seed,
               "data": dataclasses.asdict(data)}
        return cached_examples(model, run_dir, key, windows, job.max_new_tokens, eos)

    exits = base.checked_exits(L)
    classifier = (exit_classifier(model, run_dir, tokens["train"], exits, whash, job.seed)
                  if job.measure == "classifier" else None)
    cal = examples_of(job.split, job.n_examples, job.seed)
    # The grid: quantiles of the checked exits' confidences, teacher-forced on windows of
    # the train split (text that calibration never scores).
    grid_text = [Example(p, r, r) for p, r in sample_windows(
        tokens["train"], 64, job.prompt_len, job.max_new_tokens, job.seed)]
    grid = threshold_grid(exit_confidences(model, grid_text, job.measure, exits, classifier)[0],
                          job.measure, job.grid)
    walked = walk_grid(model, cal, base, grid, job.max_new_tokens, eos, job.loss, job.delta,
                       job.epsilon, job.quality, full_grid=job.check_splits > 0,
                       progress=lambda g: progress_bar(g, desc=f"thresholds ({job.measure})"),
                       classifier=classifier)
    res = ltt.calibrate_threshold(walked["thresholds"], walked["losses"], job.delta, job.epsilon)
    naive = ltt.naive_threshold(walked["thresholds"], walked["losses"], job.quality)
    conf, agree = exit_confidences(model, cal, job.measure, exits, classifier)
    result = {
        "measure": job.measure, "exits": exits, "cache": job.cache,
        "threshold": res["threshold"],           # None = never exit
        "delta": job.delta, "epsilon": job.epsilon, "loss": job.loss, "split": job.split,
        "n": job.n_examples, "prompt_len": job.prompt_len, "max_new_tokens": job.max_new_tokens,
        "seed": job.seed, "weights_hash": whash, "checkpoint": str(loaded.exits or loaded.source),
        "grid": walked["thresholds"], "risks": res["risks"], "pvalues": res["pvalues"],
        "losses": walked["losses"].tolist(),
        "naive": {"quality": job.quality, "threshold": naive},
        "dssd": {"accuracy": job.accuracy,
                 "thresholds": ltt.accuracy_level_thresholds(conf, agree, job.accuracy)},
    }
    if job.test_split:
        result["test"] = check_on(model, job, examples_of(job.test_split, job.n_test, job.seed + 1),
                                  base, {"ltt": res["threshold"], "naive": naive}, eos,
                                  classifier)
    if job.check_splits:
        result["splits"] = ltt.split_frequency(walked["thresholds"], walked["losses"],
                                               job.delta, job.epsilon, job.check_splits, job.seed)
    write_json_atomic(out, result)
    result["path"] = str(out)
    return result


def check_on(model, job: CalibrateJob, held_out: list[Example], base: DEEConfig,
             thresholds: dict, eos: StopIds, classifier=None) -> dict:
    """Loss, exits and speed of each calibrated threshold on a held-out split."""
    # Full decoding timed here, in the same process as the DEE rows it is compared with.
    windows = [(e.prompt, e.reference) for e in held_out]
    _, full = decode_full(model, progress_bar(windows, desc=f"full on {job.test_split}"),
                          job.max_new_tokens, eos)
    full_tps = full.tokens_per_s
    report = {"split": job.test_split, "n": len(held_out), "full_tokens_per_s": full_tps}
    for name, lam in thresholds.items():
        cfg = dataclasses.replace(base, threshold=[math.inf if lam is None else lam])
        losses, st = dee_losses(model, held_out, cfg, job.max_new_tokens, eos, job.loss,
                                classifier)
        report[name] = {"threshold": lam, "loss": float(losses.mean()),
                        "loss_std": float(losses.std()), "mean_exit": st.mean_exit,
                        "exit_hist": st.exit_hist,
                        "heads_per_token": st.head_evals / max(st.new_tokens, 1),
                        "tokens_per_s": st.tokens_per_s, "speedup": st.tokens_per_s / full_tps}
    return report


def report(r: dict) -> str:
    """What ``calibrate`` prints: the threshold and its guarantee, the baselines, and the
    held-out checks when they ran."""
    lam = "never exit" if r["threshold"] is None else f"{r['threshold']:.3f}"
    lines = [f"{r['measure']} threshold {lam} on {r['n']} {r['split']} prompts: expected "
             f"{r['loss']} loss <= {r['delta']} with probability >= {1 - r['epsilon']:.2f} "
             f"(exits {r['exits']}, cache={r['cache']}, greedy, {r['max_new_tokens']} new tokens)"]
    naive = r["naive"]["threshold"]
    lines.append(f"naive baseline (keep >= {r['naive']['quality']:.0%} of full quality): "
                 f"{'never exit' if naive is None else f'{naive:.3f}'} (no guarantee)")
    dssd = ", ".join("-" if t is None else f"{t:.3f}" for t in r["dssd"]["thresholds"])
    lines.append(f"DSSD per-exit thresholds at accuracy {r['dssd']['accuracy']}: [{dssd}]")
    if "test" in r:
        t = r["test"]
        for name in ("ltt", "naive"):
            row = t[name]
            exit_ = "-" if row["mean_exit"] is None else f"{row['mean_exit']:.2f}"
            lines.append(f"  {name:<5} on {t['n']} {t['split']} prompts: loss {row['loss']:.3f} "
                         f"(delta {r['delta']}), mean exit {exit_}, {row['heads_per_token']:.2f} "
                         f"heads/token, {row['speedup']:.2f}x full tokens/s")
    if "splits" in r:
        s = r["splits"]
        lines.append(f"  guarantee over {s['n_splits']} random splits: test loss > delta in "
                     f"{s['violation_rate']:.3f} of them (epsilon {r['epsilon']})")
    lines.append(f"wrote {r['path']}")
    return "\n".join(lines)
