"""Plots of the files the entry points write, shared by the benchmark and the notebooks.

Each function draws on an ``ax`` the caller made (pyplot in a notebook, a bare
``Figure`` in the benchmark, so no global pyplot state is touched there).
"""

from __future__ import annotations

import logging
import math
from typing import Optional

FAMILY_COLOURS = {"full": "black", "static": "tab:orange", "ssd": "tab:blue",
                  "dee": "tab:green", "transformers": "tab:red"}


def pareto_front(points: list[tuple[float, float]], lower_is_better: bool = False) -> list[int]:
    """Indices of the points no other point beats on both speed (x, higher is better) and
    quality (y, higher is better unless ``lower_is_better``), by increasing x."""
    sign = -1.0 if lower_is_better else 1.0
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -sign * points[i][1]))
    front, best = [], -math.inf
    for i in order:                       # fastest first: keep each that is better than all faster
        q = sign * points[i][1]
        if q > best:
            front.append(i)
            best = q
    return front[::-1]


def plot_pareto(ax, rows: list[dict], quality: str = "agreement",
                lower_is_better: bool = False, annotate: bool = True) -> None:
    """Speedup over ``full`` against a quality column, one colour per mode family,
    hollow markers for compiled rows, the Pareto front as a line."""
    rows = [r for r in rows if r.get(quality) is not None and not math.isnan(r[quality])]
    for r in rows:
        colour = FAMILY_COLOURS.get(r.get("family"), "grey")
        ax.scatter(r["speedup"], r[quality], s=22, edgecolors=colour,
                   facecolors="none" if r.get("compiled") else colour)
    front = pareto_front([(r["speedup"], r[quality]) for r in rows], lower_is_better)
    if annotate:
        # Only the front is named (the rest are dominated: their colour says their family),
        # each label nudged off its point by a step that cycles, so neighbours do not pile up.
        for n, i in enumerate(front):
            r = rows[i]
            ax.annotate(r["mode"], (r["speedup"], r[quality]), xytext=(4, 4 + 7 * (n % 3)),
                        textcoords="offset points", fontsize=6, alpha=0.8)
    ax.plot([rows[i]["speedup"] for i in front], [rows[i][quality] for i in front],
            "k--", lw=0.7, label="Pareto front")
    for family, colour in FAMILY_COLOURS.items():
        if any(r.get("family") == family for r in rows):
            ax.scatter([], [], color=colour, s=22, label=family)
    ax.axvline(1.0, color="grey", lw=0.5)
    ax.set(xlabel="speedup over full (tokens/s, same run)", ylabel=quality)
    ax.legend(fontsize=7)


def pareto_figure(rows: list[dict], title: str = ""):
    """Two panels: agreement with full greedy output and ROUGE-L against the reference."""
    from matplotlib.figure import Figure

    logging.getLogger("matplotlib").setLevel(logging.WARNING)   # font-cache INFO lines
    fig = Figure(figsize=(12, 5))
    left, right = fig.subplots(1, 2)
    plot_pareto(left, rows, "agreement")
    left.set(ylabel="token agreement with full greedy")
    plot_pareto(right, rows, "rouge_l")
    right.set(ylabel="ROUGE-L against the reference text")
    fig.suptitle(f"{title}: speed against quality (hollow = compiled)")
    return fig


def ssd_grid(rows: list[dict], compiled: bool = False, draft_vocab: int = 0,
             adaptive: float = 0.0, value: str = "speedup", ngram: int = 0):
    """(draft layers, ks, matrix[E][k] of ``value``) for the SSD rows of one variant."""
    rows = [r for r in rows if r.get("family") == "ssd" and bool(r.get("compiled")) == compiled
            and (r.get("draft_vocab") or 0) == draft_vocab
            and (r.get("adaptive_threshold") or 0.0) == adaptive
            and (r.get("ngram") or 0) == ngram and r.get("choose") != "del"]
    layers = sorted({r["draft_layer"] for r in rows})
    ks = sorted({r["k"] for r in rows})
    grid = [[math.nan] * len(ks) for _ in layers]
    for r in rows:
        grid[layers.index(r["draft_layer"])][ks.index(r["k"])] = r[value]
    return layers, ks, grid


def plot_ssd_heatmap(ax, rows: list[dict], value: str = "speedup", **variant) -> None:
    layers, ks, grid = ssd_grid(rows, value=value, **variant)
    im = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
    ax.set_xticks(range(len(ks)), [str(k) for k in ks])
    ax.set_yticks(range(len(layers)), [str(e) for e in layers])
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white", fontsize=8)
    ax.set(xlabel="k (draft tokens per round)", ylabel="draft exit E", title=value)
    ax.figure.colorbar(im, ax=ax)


def plot_exit_curves(ax, metrics: list[dict], key: str = "val_word_ppl",
                     label: Optional[str] = None, log: bool = True) -> None:
    """One line per exit of a metrics.jsonl list-valued column over training steps."""
    rows = [m for m in metrics if key in m]
    steps = [m["step"] for m in rows]
    for e in range(len(rows[0][key]) if rows else 0):
        ax.plot(steps, [m[key][e] for m in rows], label=f"exit {e + 1}")
    ax.set(xlabel="step", ylabel=key, title=label or key)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=7)


def plot_exit_quality(ax_ppl, ax_agree, evals: dict[str, dict]) -> None:
    """Per-exit word perplexity and top-1 agreement with the last exit, from evaluate's
    JSON, one line per named evaluation; the x axis is the exit's relative depth E/L so
    models of different depth share it."""
    for name, ev in evals.items():
        L = len(ev["word_ppl"])
        depth = [e / L for e in range(1, L + 1)]
        ax_ppl.plot(depth, ev["word_ppl"], "o-", label=name)
        ax_agree.plot(depth, ev["agreement"], "o-", label=name)
    ax_ppl.set(xlabel="exit depth E / L", ylabel="word-level perplexity", yscale="log")
    ax_agree.set(xlabel="exit depth E / L", ylabel="top-1 agreement with the last exit",
                 ylim=(0, 1.02))
    ax_ppl.legend(fontsize=7)
    ax_agree.legend(fontsize=7)
