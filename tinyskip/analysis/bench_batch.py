"""Decoding at batch > 1: full decoding and SSD side by side at each of the benchmark's
``batch_sizes`` (``python -m tinyskip.bench ... batch_sizes=[1,4,16]``).

The rows of a batch are prompts of different lengths (the benchmark's windows cut to
5/8..1 of ``prompt_len``), so batched SSD meets ragged positions from its first step.
Every batch size decodes the same prompts, in groups of its size; tokens/s counts every
row's new tokens over the batches' decoding time, and each SSD row's speedup is against
full decoding at the same batch size, run interleaved with it group by group. Compiled
steps decode every group once untimed first (each batch size and verify width is a graph
of its own).
"""

from __future__ import annotations

import torch

from ..bench_jobs import BenchJob
from ..config import SSDConfig
from ..decode import DecodeStats, ModeSpec, Steps, decode
from ..decode.steps import ragged_batch
from ..runtime import progress_bar


def ragged(prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Prompt i (1, T) cut to its first T - (i % 4) * T // 8 tokens, as a (T_i,) row."""
    return [p[0, :max(1, p.shape[1] - (i % 4) * p.shape[1] // 8)] for i, p in enumerate(prompts)]


def batch_specs(job: BenchJob) -> list[ModeSpec]:
    """Full decoding and every draft_layer x k SSD configuration (drafts from the exit)."""
    return [ModeSpec("full")] + [ModeSpec("ssd", ssd=SSDConfig(e, k))
                                 for e in job.draft_layer for k in job.k]


def batch_rows(job: BenchJob, prompts: list[torch.Tensor], steps: Steps) -> list[dict]:
    """One row per (batch size, configuration); ``prompts`` (1, T) each, at least as many
    as the largest batch size."""
    rows_of = ragged(prompts)
    specs = batch_specs(job)

    def run(spec: ModeSpec, group: list[torch.Tensor]):
        batch, lengths = ragged_batch(group, prompts[0].device)
        return decode(steps.model, batch, job.max_new_tokens, spec, steps=steps,
                      lengths=lengths if len(group) > 1 else None)

    # Groups of b rows (the same prompts at every batch size): (batch size, group index, rows)
    work = [(b, i // b, rows_of[i:i + b]) for b in job.batch_sizes
            for i in range(0, len(rows_of) // b * b, b)]
    for b, i, group in progress_bar(work, desc="batch warm-up"):
        if steps.compiled or i == 0:
            for spec in specs:
                run(spec, group)
    stats = {(b, s.label): DecodeStats() for b in job.batch_sizes for s in specs}
    tokens = {key: [] for key in stats}
    for b, _, group in progress_bar(work, desc="batch sweep"):
        for spec in specs:
            gen = run(spec, group)
            stats[b, spec.label] = stats[b, spec.label] + gen.stats
            tokens[b, spec.label] += gen.tokens
    rows = []
    for b in job.batch_sizes:
        full = stats[b, "full"]
        for spec in specs:
            st, out = stats[b, spec.label], tokens[b, spec.label]
            rows.append({"batch_size": b, "mode": spec.label, "compiled": steps.compiled,
                         "prompts": len(out), "new_tokens": st.new_tokens,
                         "tokens_per_s": st.tokens_per_s,
                         "speedup": st.tokens_per_s / full.tokens_per_s,
                         "acceptance": st.accepted / st.drafted if st.drafted else None,
                         "mean_accepted": st.accepted / st.rounds if st.drafted else None,
                         # rows whose tokens equal full decoding's at this batch size
                         "exact_match": sum(a == f for a, f in zip(out, tokens[b, "full"])) / len(out)})
    return rows


def format_batch(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    lines = ["| batch | mode | compiled | prompts | new tokens | tok/s (all rows) | speedup vs "
             "full at this batch | acceptance | mean accepted | exact vs full |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        mean = "-" if r["mean_accepted"] is None else f"{r['mean_accepted']:.2f}"
        lines.append(f"| {r['batch_size']} | {r['mode']} | {'yes' if r['compiled'] else 'no'} | "
                     f"{r['prompts']} | {r['new_tokens']} | {r['tokens_per_s']:.1f} | "
                     f"{r['speedup']:.2f}x | {acc} | {mean} | {r['exact_match']:.2f} |")
    return "\n".join(lines)
