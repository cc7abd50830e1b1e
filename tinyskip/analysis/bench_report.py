"""The benchmark's results as a terminal table and as files a notebook or a README reads.

``write_results`` writes into one folder (by default ``logs/bench/<run>/<timestamp>/``):
``results.json`` (everything, unit costs included), ``results.csv`` (one row per
configuration; histograms as JSON strings), ``results.md`` (the Markdown table the
README quotes) and ``pareto.png`` (speed against quality, the Pareto front marked);
with ``tensorboard``, the rows' measurements as TensorBoard scalars in ``tensorboard/``.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..atomic import make_dirs, write_bytes_atomic, write_json_atomic, write_text_atomic
from ..decode.run import CACHE_RESIDENT_BYTES
from ..tb_log import ScalarLog
from .bench_batch import format_batch
from .engine_levers import format_levers
from .plots import pareto_figure
from .ssd_costs import format_round_costs

CSV_COLUMNS = ["mode", "family", "compiled", "exit_layer", "draft_layer", "k", "draft_vocab",
               "adaptive_threshold", "ngram", "ngram_k", "choose", "ssd_exits", "measure", "threshold", "exits", "cache", "calibration",
               "tokens_per_s", "tokens_per_s_prompt_mean", "speedup", "prefill_ms",
               "layers_per_token", "heads_per_token", "predicted", "efficiency", "acceptance",
               "accept_hist", "lookup_share", "exit_rounds", "draft_hist", "mean_exit", "exit_hist", "agreement", "exact_match", "f1_loss",
               "ppl", "rouge_l", "warmup_s", "bytes_per_token", "gb_per_s", "precision",
               "text_ppl"]
# What TensorBoard gets of a row, each as ``<column>/<row label>`` at step 0: its
# measurements (its configuration is in the label).
SCALAR_COLUMNS = ["tokens_per_s", "tokens_per_s_prompt_mean", "speedup", "prefill_ms",
                  "layers_per_token", "heads_per_token", "predicted", "efficiency",
                  "acceptance", "lookup_share", "mean_exit", "agreement", "exact_match",
                  "f1_loss", "ppl", "rouge_l", "gb_per_s", "text_ppl"]


def _num(x, fmt: str, suffix: str = "") -> str:
    return "-" if x is None else f"{x:{fmt}}{suffix}"


def describe(res: dict) -> str:
    """What was measured, where, and the unit costs against the matmul floor."""
    c = res["costs"]
    return (f"{res['checkpoint']}: {res['prompts']} prompts of {res['prompt_len']} tokens from "
            f"the test split, {res['max_new_tokens']} new tokens, {sampled(res)}, {res['device']}, "
            f"{res['threads']} threads. One block {c['layer:1'] * 1e6:.0f} us, head "
            f"{c['head:1'] * 1e6:.0f} us, full step {c['step'] * 1e6:.0f} us (outside blocks "
            f"and head: {c['overhead'] * 100:.1f}%); the step's matrix products as eager "
            f"calls {c['matmuls'] * 1e6:.0f} us ({c['matmuls'] / c['step'] * 100:.0f}% of the "
            f"step; levers=true measures them in one compiled graph, the floor). {stream_line(res)}")


def sampled(res: dict) -> str:
    t = res.get("temperature", 0.0)
    return ("greedy" if not t else f"sampled at temperature {t:g} (agreement and exact match "
            "then count chance coincidences with the full row's draw)")


def stream_line(res: dict) -> str:
    """The streaming read the % columns divide by, with its spread over the run."""
    return (f"A streaming read of memory: {res['stream_gb_per_s']:.1f} GB/s, the median of "
            f"{res['stream_samples']} reads between the rows ({res['stream_gb_per_s_min']:.1f}"
            f"-{res['stream_gb_per_s_max']:.1f}).")


def format_prefill(res: dict) -> str:
    """Prefill of one long prompt per precision against its dtype's matrix peak."""
    lines = ["| precision | prefill tokens | tokens/s | TFLOP/s | matrix peak TFLOP/s | of peak |",
             "|---|---:|---:|---:|---:|---:|"]
    for p in res.get("prefill") or []:
        lines.append(f"| {p['precision']} | {p['prefill_tokens']} | "
                     f"{p['prefill_tokens_per_s']:.0f} | {p['prefill_tflops']:.3f} | "
                     f"{p['matrix_peak_tflops']:.3f} | {p['prefill_of_peak']:.0%} |")
    return "\n".join(lines)


def format_table(res: dict) -> str:
    cols = (f"{'mode':<46}{'tok/s':>8}{'speedup':>9}{'layers/t':>9}{'heads/t':>8}{'accept':>8}"
            f"{'exit':>6}{'agree':>7}{'exact':>6}{'f1loss':>7}{'ppl':>8}{'rougeL':>7}"
            f"{'predicted':>10}{'effic.':>8}{'GB/s':>7}{'% stream':>9}")
    lines = [describe(res), cols, "-" * len(cols)]
    for r in res["rows"]:
        lines.append(f"{r['mode']:<46}{r['tokens_per_s']:>8.1f}{r['speedup']:>8.2f}x"
                     f"{r['layers_per_token']:>9.2f}{r['heads_per_token']:>8.2f}"
                     f"{_num(r['acceptance'], '.2f'):>8}{_num(r['mean_exit'], '.2f'):>6}"
                     f"{r['agreement']:>7.2f}{r['exact_match']:>6.2f}{r['f1_loss']:>7.3f}"
                     f"{r['ppl']:>8.1f}{r['rouge_l']:>7.3f}{_num(r['predicted'], '.2f', 'x'):>10}"
                     f"{_num(r['efficiency'], '.2f'):>8}{r['gb_per_s']:>7.1f}"
                     f"{r['gb_per_s'] / res['stream_gb_per_s']:>9.0%}")
    for r in res["hf"]:
        lines.append(f"{r['mode']:<46}{r['tokens_per_s']:>8.1f}{r['speedup']:>8.2f}x"
                     f"{'':>33}{r['agreement']:>7.2f}{'':>13}{r['ppl']:>8.1f}"
                     f"{r['rouge_l']:>7.3f}   (transformers, same weights)")
    if res.get("prefill"):
        lines += ["", format_prefill(res)]
    if res.get("batch"):
        lines += ["", format_batch(res["batch"])]
    if res.get("levers"):
        lines += ["", format_levers(res["levers"])]
    if res.get("ssd_costs"):
        lines += ["", format_round_costs(res["ssd_costs"])]
    note = regime_line(res)
    if note:
        lines += ["", note]
    return "\n".join(lines)


def regime_line(res: dict) -> str:
    """One honest line when early exit measured slower than full decoding, saying where
    it does pay; empty when every SSD and DEE row beat full."""
    # Each row against full decoding run the same way (compiled rows against compiled full)
    # at the same precision (the sweep's; precisions= rows decode full alone).
    main = res["rows"][0]["precision"]
    full = {r["compiled"]: r["tokens_per_s"] for r in res["rows"]
            if r["family"] == "full" and r["precision"] == main}
    ratios = [r["tokens_per_s"] / full[r["compiled"]] for r in res["rows"]
              if r["family"] in ("ssd", "dee") and r["compiled"] in full]
    slower = [x for x in ratios if x < 1]
    if not slower:
        return ""
    head = (f"{len(slower)} of the SSD/DEE rows ran slower than full decoding run the same "
            f"way (down to {min(slower):.2f}x). ")
    size = res.get("weights_bytes", 0)
    if size >= CACHE_RESIDENT_BYTES:
        return head + (f"This model's weights ({size / 1e6:.0f} MB) are read from memory at "
                       "every step: those rows lose where their exits agree with the last "
                       "layer too rarely to pay for the drafts and confidence checks they add "
                       "(the acceptance and agreement columns).")
    return head + ("On a model whose weights stay in the CPU's cache a step costs compute and "
                   "per-op overhead, so a draft or a confidence check costs nearly what it "
                   "saves; early exit pays where decoding is bound by reading the weights "
                   "(docs/results/decoding.md).")


def format_markdown(res: dict) -> str:
    """A GitHub table of every configuration (the README's results are pasted from it)."""
    head = ["mode", "tok/s", "tok/s (prompt mean)", "speedup", "prefill ms", "layers/tok",
            "heads/tok", "acceptance", "mean exit", "agreement", "exact", "f1 loss", "ppl",
            "ROUGE-L", "predicted", "efficiency", "GB/s read", "test-text ppl"]
    lines = [describe(res), "", "| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in res["rows"] + res["hf"]:
        cells = [r["mode"], _num(r["tokens_per_s"], ".1f"),
                 _num(r.get("tokens_per_s_prompt_mean"), ".1f"), _num(r["speedup"], ".2f", "x"),
                 _num(r.get("prefill_ms"), ".1f"), _num(r.get("layers_per_token"), ".2f"),
                 _num(r.get("heads_per_token"), ".2f"), _num(r.get("acceptance"), ".2f"),
                 _num(r.get("mean_exit"), ".2f"), _num(r["agreement"], ".3f"),
                 _num(r.get("exact_match"), ".2f"), _num(r.get("f1_loss"), ".3f"),
                 _num(r["ppl"], ".1f"), _num(r["rouge_l"], ".3f"),
                 _num(r.get("predicted"), ".2f", "x"), _num(r.get("efficiency"), ".2f"),
                 _num(r.get("gb_per_s"), ".1f"), _num(r.get("text_ppl"), ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    if res.get("prefill"):
        lines += ["", format_prefill(res)]
    if res.get("batch"):
        lines += ["", format_batch(res["batch"])]
    if res.get("levers"):
        lines += ["", format_levers(res["levers"])]
    if res.get("ssd_costs"):
        lines += ["", format_round_costs(res["ssd_costs"])]
    return "\n".join(lines) + "\n"


def format_csv(res: dict) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in res["rows"] + res["hf"]:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v
                         for k, v in r.items()})
    return buf.getvalue()


def tensorboard_scalars(res: dict) -> dict[str, float]:
    """Every row's measurements as TensorBoard tags (a mode has None where it measures
    nothing of the kind, and the transformers rows fewer columns: left out)."""
    return {f"{col}/{r['mode']}": r[col] for r in res["rows"] + res["hf"]
            for col in SCALAR_COLUMNS if r.get(col) is not None}


def write_results(res: dict, out: Path, tensorboard: bool = False) -> Path:
    """Every result file, each written atomically, and with ``tensorboard`` the rows'
    scalars (an event file, through TensorBoard's writer); returns the folder."""
    make_dirs(out)
    write_json_atomic(out / "results.json", res)
    write_text_atomic(out / "results.csv", format_csv(res))
    write_text_atomic(out / "results.md", format_markdown(res))
    fig = pareto_figure(res["rows"] + res["hf"], title=Path(res["checkpoint"]).parent.name)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    write_bytes_atomic(out / "pareto.png", buf.getvalue())
    if tensorboard:
        log = ScalarLog(out)
        log.scalars(0, tensorboard_scalars(res))
        log.close()
    return out
