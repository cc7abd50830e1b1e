"""``python -m tinyskip.bench run=NAME``: decoding modes side by side, one process, same prompts.

Prints per mode: tokens/s, speedup over ``full`` measured in the same run, layer and
head evaluations per token, acceptance, token agreement with full greedy decoding, and
the efficiency = measured speedup / speedup predicted from the counted evaluations,
with the cost of one block and of the head on one token measured in the same run.
Modes run interleaved prompt by prompt, so drift in machine speed hits all alike.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .cache import KVCache
from .atomic import write_json_atomic
from .cli import entry_point
from .config import DEEConfig, SSDConfig, UserError
from .data import load_lines
from .decode import DecodeStats, ModeSpec, Steps, decode
from .hf_baseline import hf_rows
from .jobs import BenchJob
from .loading import (draft_vocabulary, exit_classifier_for, load_source, pick_device,
                      run_data_config)
from .ltt import f1_loss
from .model import Transformer


@torch.no_grad()
def unit_costs(model: Transformer, pos: int, max_width: int, reps: int = 100) -> dict:
    """Median seconds of one block call and one head call on 1..max_width positions, and
    of a whole one-token full step through the decoders' API.

    Blocks are timed cycling through all L (so weights stream from memory as in a real
    step) and the head right after them: ``head:w`` is (L blocks + head) - (L blocks),
    which charges the head with the cache misses its weight causes. What a full step
    costs beyond L blocks and the head (embedding, attention set-up, argmax, Python)
    is the bookkeeping overhead.
    """
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    L = model.num_layers
    cache = KVCache(model.config, 1, pos + max_width, dev, dtype)
    x = torch.zeros(1, 1, dtype=torch.long, device=dev)

    def timed(fn) -> float:
        for _ in range(5):
            fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def blocks(h, ctx):
        for layer in model.layers:
            h = layer(h, ctx)
        return h

    costs = {}
    for w in range(1, max_width + 1):
        h0 = model.embed(torch.zeros(1, w, dtype=torch.long, device=dev))
        ctx = model.context(pos, w, cache, 1)
        t_blocks = timed(lambda: blocks(h0, ctx))
        costs[f"layer:{w}"] = t_blocks / L
        costs[f"head:{w}"] = max(timed(lambda: model.head(blocks(h0, ctx))) - t_blocks, 0.0)
    # The step's matrix work alone: every weight of the blocks and the head applied to one
    # token, nothing else (no norms, RoPE, attention or bookkeeping): the floor the step's
    # time would reach if everything between the matmuls were free.
    mats = [m.weight for layer in model.layers for m in layer.modules()
            if isinstance(m, torch.nn.Linear)] + [model.lm_head.weight]
    vecs = {w.shape[1]: torch.randn(1, w.shape[1], device=dev, dtype=dtype) for w in mats}
    costs["matmuls"] = timed(lambda: [torch.nn.functional.linear(vecs[w.shape[1]], w) for w in mats])
    h1 = model.embed(x)
    costs["kv:1"] = timed(lambda: model.propagate_kv(h1, 0, L, cache, pos)) / L
    step = timed(lambda: model.head(model.run_layers(model.embed(x), 0, L, cache, pos)[:, -1])
                 .argmax(-1))
    costs["step"] = step
    costs["overhead"] = (step - L * costs["layer:1"] - costs["head:1"]) / step
    return costs


def bench_specs(job: BenchJob, L: int) -> list[ModeSpec]:
    specs = [ModeSpec("full")]
    specs += [ModeSpec("static", exit_layer=e) for e in job.static_layers]
    for e in job.ssd_layers:
        for k in job.ssd_k:
            specs.append(ModeSpec("ssd", ssd=SSDConfig(e, k)))
            if job.draft_vocab:
                specs.append(ModeSpec("ssd", ssd=SSDConfig(e, k, draft_vocab=job.draft_vocab)))
            if job.adaptive_threshold:
                specs.append(ModeSpec("ssd", ssd=SSDConfig(e, k, job.adaptive_threshold)))
    for measure in job.dee_measures:
        for lam in job.dee_thresholds:
            for cache in job.dee_caches:
                specs.append(ModeSpec("dee", dee=DEEConfig(measure, [lam], cache=cache,
                                                           check_every=job.dee_check_every)))
    for s in specs:                       # every option checked before anything runs
        s.validate(L)
    return specs


def test_prompts(data, job: BenchJob, tokenizer, device) -> list[torch.Tensor]:
    """``n_prompts`` windows of ``prompt_len`` tokens spread over the test split."""
    text = " ".join(line.strip() for line in load_lines(data)[0]["test"] if line.strip())
    ids = tokenizer.encode(text)
    stride = (len(ids) - job.prompt_len) // job.n_prompts
    return [torch.tensor([ids[i * stride:i * stride + job.prompt_len]], device=device)
            for i in range(job.n_prompts)]


def benchmark(job: BenchJob) -> dict:
    device = pick_device(job.device)
    if job.threads:
        torch.set_num_threads(job.threads)
    loaded = load_source(job.run, job.checkpoint, job.checkpoint_root, job.model, device, job.dtype)
    model = loaded.model
    prompts = test_prompts(run_data_config(Path(loaded.source), job.data), job, loaded.tokenizer,
                           device)
    L = model.num_layers
    specs = bench_specs(job, L)
    bad = [e for e in job.hf_early_exit if not 1 <= e < L]
    if bad:
        raise UserError(f"hf_early_exit={job.hf_early_exit}: exits must be in 1..{L - 1} for "
                        f"this {L}-layer model")
    if job.hf_baseline and loaded.tokenizer_file is None:
        raise UserError("hf_baseline=true compares with a tinyskip checkpoint exported to "
                        "transformers: give run= or checkpoint=")
    for spec in specs:
        spec.classifier = exit_classifier_for(loaded, spec)
    vocab_spec = next((s for s in specs if s.ssd is not None and s.ssd.draft_vocab), None)
    draft_ids = draft_vocabulary(loaded, vocab_spec, job.data) if vocab_spec else None
    # Rows: (label, spec, steps). Compiled rows run the same modes through compiled steps
    # (DEE's per-layer steps stay eager); the first row, eager full, is the reference.
    eager, compiled = Steps(model), Steps(model, compile=True) if job.compile else None
    rows_def = [(s.label, s, eager) for s in specs]
    if compiled is not None:
        rows_def += [(s.label + " compiled", s, compiled) for s in specs if s.mode != "dee"]
    run = lambda spec, steps, prompt: decode(model, prompt, job.max_new_tokens, spec, draft_ids=(
        draft_ids if spec.ssd is not None and spec.ssd.draft_vocab else None), steps=steps)
    warmup = {}
    for label, spec, steps in tqdm(rows_def, desc="warm-up (compiles)", leave=False,
                                   disable=not sys.stderr.isatty()):
        t0 = time.perf_counter()
        run(spec, steps, prompts[0])
        warmup[label] = time.perf_counter() - t0
    totals = {label: {"stats": DecodeStats(), "agree": 0, "exact": 0, "f1_loss": 0.0}
              for label, _, _ in rows_def}
    references = []
    for prompt in tqdm(prompts, desc="prompts", leave=False, disable=not sys.stderr.isatty()):
        reference = None
        for label, spec, steps in rows_def:
            g = run(spec, steps, prompt)
            t = totals[label]
            if reference is None:
                reference = g.tokens[0]
                references.append(reference)
            t["stats"] = t["stats"] + g.stats
            t["agree"] += sum(a == b for a, b in zip(g.tokens[0], reference))
            t["exact"] += g.tokens[0] == reference
            t["f1_loss"] += f1_loss(g.tokens[0], reference)     # DEE's calibration loss
    widths = [int(k.split(":")[1]) for t in totals.values() for k in t["stats"].calls]
    costs = unit_costs(model, job.prompt_len + job.max_new_tokens // 2, max(widths))
    rows = []
    for label, _, _ in rows_def:
        t = totals[label]
        st, n = t["stats"], t["stats"].new_tokens
        # Predicted seconds per token: every counted call at its measured unit cost.
        cost = sum(count * costs[key] for key, count in st.calls.items()) / n
        rows.append({"mode": label, "tokens_per_s": st.tokens_per_s,
                     "layers_per_token": st.layer_evals / n, "heads_per_token": st.head_evals / n,
                     "acceptance": st.accepted / st.drafted if st.drafted else None,
                     "mean_exit": st.mean_exit, "exit_hist": st.exit_hist,
                     "agreement": t["agree"] / n, "exact_match": t["exact"] / len(prompts),
                     "f1_loss": t["f1_loss"] / len(prompts),
                     "cost_s": cost, "prefill_ms": st.prefill_s / len(prompts) * 1e3,
                     "warmup_s": warmup[label]})
    full = rows[0]
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / full["tokens_per_s"]
        r["predicted"] = full["cost_s"] / r["cost_s"]
        r["efficiency"] = r["speedup"] / r["predicted"]
    hf = []
    if job.hf_baseline and loaded.tokenizer_file is not None:
        hf = hf_rows(model, loaded.tokenizer_file, prompts, job.max_new_tokens,
                     job.hf_early_exit, references)
        for r in hf:
            r["speedup"] = r["tokens_per_s"] / full["tokens_per_s"]
    return {"checkpoint": loaded.source, "hf": hf, "device": str(device), "threads": torch.get_num_threads(),
            "prompts": len(prompts), "prompt_len": job.prompt_len,
            "max_new_tokens": job.max_new_tokens, "costs": costs, "rows": rows}


def format_table(res: dict) -> str:
    c = res["costs"]
    head = (f"{res['checkpoint']}: {res['prompts']} prompts of {res['prompt_len']} tokens from the "
            f"test split, {res['max_new_tokens']} new tokens, greedy, {res['device']}, "
            f"{res['threads']} threads\n"
            f"one block {c['layer:1'] * 1e6:.0f} us, head {c['head:1'] * 1e6:.0f} us, full step "
            f"{c['step'] * 1e6:.0f} us: overhead outside blocks and head "
            f"{c['overhead'] * 100:.1f}% of a full step; the step's matmuls alone "
            f"{c['matmuls'] * 1e6:.0f} us ({c['matmuls'] / c['step'] * 100:.0f}% of the step)\n")
    cols = f"{'mode':<34}{'tok/s':>8}{'speedup':>9}{'layers/t':>9}{'heads/t':>8}" \
           f"{'accept':>8}{'exit':>6}{'agree':>7}{'exact':>6}{'f1loss':>7}{'predicted':>10}" \
           f"{'effic.':>8}"
    lines = [head + cols, "-" * len(cols)]
    for r in res["rows"]:
        acc = f"{r['acceptance']:.2f}" if r["acceptance"] is not None else "-"
        ex = f"{r['mean_exit']:.2f}" if r["mean_exit"] is not None else "-"
        lines.append(f"{r['mode']:<34}{r['tokens_per_s']:>8.1f}{r['speedup']:>8.2f}x"
                     f"{r['layers_per_token']:>9.2f}{r['heads_per_token']:>8.2f}{acc:>8}{ex:>6}"
                     f"{r['agreement']:>7.2f}{r['exact_match']:>6.2f}{r['f1_loss']:>7.3f}"
                     f"{r['predicted']:>9.2f}x"
                     f"{r['efficiency']:>8.2f}")
    for r in res.get("hf", []):
        lines.append(f"{r['mode']:<34}{r['tokens_per_s']:>8.1f}{r['speedup']:>8.2f}x"
                     f"{'':>33}{r['agreement']:>7.2f}   (transformers, same weights)")
    return "\n".join(lines)


@entry_point("bench")
def main(job: BenchJob) -> None:
    res = benchmark(job)
    print(format_table(res))
    if job.out:
        write_json_atomic(Path(job.out).resolve(), res)


if __name__ == "__main__":
    main()
