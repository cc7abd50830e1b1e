"""The decoding benchmark behind ``python -m tinyskip.bench run=NAME``: a sweep of decoding
modes in one process, on the same prompts, with ``full`` in the same run.

Per configuration: tokens/s (over all tokens and as a per-prompt mean), prefill time,
speedup over ``full`` measured side by side, layer and head evaluations per token, the
speedup those counts predict from unit costs measured in the same run and the efficiency
(measured / predicted), acceptance and its histogram, the exit histogram, and quality:
token agreement and exact match with full greedy output, DEE's f1 consistency loss,
perplexity of the generated text under the full model, and ROUGE-L against the test
text that really follows the prompt. Modes run interleaved prompt by prompt, so drift
in machine speed hits all alike. Results go to ``out_dir`` (see bench_report.py).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..calibration.ltt import f1_loss
from ..config import DEEConfig, SamplingConfig, SSDConfig, UserError
from ..decode import DecodeStats, ModeSpec, Steps, decode
from ..decode.steps import cache_size
from ..bench_jobs import BenchJob, precision, precision_name
from ..runtime import matrix_peak, pick_device, progress_bar
from ..storage.data import load_lines
from ..storage.loading import (Loaded, check_calibrated_length, draft_vocabulary,
                               exit_classifier_for, load_source, read_calibration, run_data_config,
                               split_ids)
from .bandwidth import StreamRead, bytes_per_token, module_bytes
from .bench_batch import batch_rows
from .engine_levers import step_levers
from .hf_baseline import hf_rows
from .prefill import prefill_speed
from .quality import RougeL, continuation_nll, perplexity
from .ssd_costs import measured_acceptance, round_costs
from .unit_costs import unit_costs


def lookup_lengths(job: BenchJob) -> list[int]:
    """The ngram_k of the rows with prompt lookup: k (0), then each of ``job.ngram_k``."""
    return [0, *job.ngram_k] if job.ngram else [0]


def bench_specs(job: BenchJob, L: int) -> list[ModeSpec]:
    """The sweep's configurations from the job's lists (calibration files aside)."""
    specs = [ModeSpec("full")]
    static = job.exit_layer if job.exit_layer is not None else range(1, L)
    specs += [ModeSpec("static", exit_layer=e) for e in static]
    for e in job.draft_layer:
        for k in job.k:
            specs.append(ModeSpec("ssd", ssd=SSDConfig(e, k)))
            if job.draft_vocab:
                specs.append(ModeSpec("ssd", ssd=SSDConfig(e, k, draft_vocab=job.draft_vocab)))
            if job.adaptive_threshold:
                specs.append(ModeSpec("ssd", ssd=SSDConfig(e, k, job.adaptive_threshold)))
            levers = (job.adaptive_threshold, job.draft_vocab, job.ngram)
            for nk in lookup_lengths(job):
                if job.ngram:
                    specs.append(ModeSpec("ssd", ssd=SSDConfig(e, k, ngram=job.ngram,
                                                               ngram_k=nk)))
                if sum(map(bool, levers)) > 1:          # and all of them in one row
                    specs.append(ModeSpec("ssd", ssd=SSDConfig(e, k, *levers, ngram_k=nk)))
    for k in job.k if job.choose_del else ():
        specs.append(ModeSpec("ssd", ssd=SSDConfig(None, k, choose="del",
                                                   exits=list(job.ssd_exits))))
        if job.draft_vocab or job.adaptive_threshold or job.ngram:   # and with the levers
            for nk in lookup_lengths(job):
                specs.append(ModeSpec("ssd", ssd=SSDConfig(None, k, job.adaptive_threshold,
                                                           job.draft_vocab, job.ngram,
                                                           choose="del",
                                                           exits=list(job.ssd_exits),
                                                           ngram_k=nk)))
    for measure in job.measure:
        for lam in job.threshold:
            for cache in job.cache:
                specs.append(ModeSpec("dee", dee=DEEConfig(measure, [lam], cache=cache,
                                                           check_every=job.check_every,
                                                           exits=list(job.exits))))
    for s in specs:                       # every option checked before anything runs
        s.validate(L)
    return specs


def calibrated_specs(job: BenchJob, loaded: Loaded) -> list[tuple[str, ModeSpec]]:
    """One DEE row per calibration file: the decoder the file certifies, refused when the
    file was made for other weights."""
    out = []
    for path in job.calibration:
        cal = read_calibration(Path(path), loaded)
        check_calibrated_length(Path(path), cal, job.max_new_tokens)
        spec = ModeSpec("dee", dee=DEEConfig(cal["measure"], cal["threshold"], cal["exits"],
                                             cache=cal["cache"]))
        spec.validate(loaded.model.num_layers)
        out.append((path, spec))
    return out


def test_prompts(ids: list[int], job: BenchJob,
                 device) -> tuple[list[torch.Tensor], list[list[int]]]:
    """``n_prompts`` windows of ``prompt_len`` tokens spread over the test split's ``ids``,
    and the ``max_new_tokens`` tokens that follow each in the text (ROUGE-L's reference)."""
    span = job.prompt_len + job.max_new_tokens
    if len(ids) < span:
        raise UserError(f"prompt_len + max_new_tokens = {span} tokens: the test split holds "
                        f"only {len(ids)}")
    stride = (len(ids) - span) // job.n_prompts
    starts = [i * stride for i in range(job.n_prompts)]
    prompts = [torch.tensor([ids[s:s + job.prompt_len]], device=device) for s in starts]
    return prompts, [ids[s + job.prompt_len:s + span] for s in starts]


def spec_fields(spec: ModeSpec) -> dict:
    """The configuration as columns (None where a mode has no such option)."""
    s, d = spec.ssd, spec.dee
    return {"family": spec.mode, "exit_layer": spec.exit_layer,
            "draft_layer": s.draft_layer if s else None, "k": s.k if s else None,
            "choose": s.choose if s else None, "ssd_exits": s.exits if s else None,
            "draft_vocab": s.draft_vocab if s else None,
            "adaptive_threshold": s.adaptive_threshold if s else None,
            "ngram": s.ngram if s else None,
            "ngram_k": s.lookup_k if s and s.ngram else None,     # the length lookup drafted
            "measure": d.measure if d else None,
            "threshold": d.threshold[0] if d and len(d.threshold) == 1 else None,
            "exits": d.exits if d else None, "cache": d.cache if d else None}


class Quality:
    """Perplexity under the full model and ROUGE-L of generations, each distinct token
    list scored once (greedy modes mostly reproduce the full model's output)."""

    def __init__(self, loaded: Loaded, prompts: list[torch.Tensor], references: list[list[int]]):
        self.loaded, self.prompts, self.ref_ids = loaded, prompts, references
        self.references = [loaded.tokenizer.decode(r) for r in references]
        self.rouge = RougeL()
        self._nll: dict = {}
        self._text: dict = {}

    def text_ppl(self, model) -> float:
        """Perplexity of the test text that follows each prompt (the references) under
        ``model``: a precision's own quality, beside its agreement with full decoding."""
        if id(model) not in self._text:
            nll = sum(continuation_nll(model, p, r) for p, r in zip(self.prompts, self.ref_ids))
            self._text[id(model)] = perplexity(nll, sum(len(r) for r in self.ref_ids))
        return self._text[id(model)]

    def __call__(self, generated: list[list[int]]) -> dict:
        nll = rouge = 0.0
        for i, tokens in enumerate(generated):
            key = (i, tuple(tokens))
            if key not in self._nll:
                self._nll[key] = continuation_nll(self.loaded.model, self.prompts[i], tokens)
            nll += self._nll[key]
            rouge += self.rouge(self.references[i], self.loaded.tokenizer.decode(tokens))
        return {"ppl": perplexity(nll, sum(len(t) for t in generated)),
                "rouge_l": rouge / len(generated)}


def benchmark(job: BenchJob) -> dict:
    device = pick_device(job.device)
    if job.threads:
        torch.set_num_threads(job.threads)
    loaded = load_source(job.run, job.checkpoint, job.checkpoint_root, job.model, device, job.dtype,
                         job.quantize)
    model = loaded.model
    lines, _ = load_lines(run_data_config(loaded.run_dir, job.data))
    ids = split_ids(lines, loaded.tokenizer, ["test"])["test"].tolist()
    prompts, references = test_prompts(ids, job, device)
    L = model.num_layers
    ctx = model.config.max_position_embeddings
    if job.prefill_len and not job.prefill_len < min(len(ids), ctx):
        raise UserError(f"prefill_len={job.prefill_len}: must be shorter than the test split "
                        f"({len(ids)} tokens) and the context ({ctx})")
    bad = [e for e in job.hf_early_exit if not 1 <= e < L]
    if bad:
        raise UserError(f"hf_early_exit={job.hf_early_exit}: exits must be in 1..{L - 1} for "
                        f"this {L}-layer model")
    mid, needed = job.prompt_len + job.max_new_tokens // 2, job.prompt_len + job.max_new_tokens
    if job.ssd_costs and mid + max(job.k) + 1 > cache_size(model, needed):
        # Refused before the sweep, not after it: the priced verify would run past the cache.
        raise UserError(f"ssd_costs=true with k={job.k}: a round at position {mid} "
                        f"verifies {max(job.k) + 1} positions, past this generation's "
                        f"{cache_size(model, needed)}-slot cache (give a smaller k)")
    # (DEE threshold rows name the exits they check where the job lists them; calibrated
    # rows check the exits their file certifies, every one of them on a bare model)
    checked = f" exits={','.join(map(str, job.exits))}" if job.exits else ""
    labelled = [(s.label + (checked if s.mode == "dee" else ""), s, None)
                for s in bench_specs(job, L)]
    for _, spec, _ in labelled:           # del's candidates against the model's modules
        if spec.ssd is not None and spec.ssd.choose == "del":
            spec.ssd.candidates(L, model.module_exits)
    labelled += [(f"{s.label} calibrated", s, path) for path, s in calibrated_specs(job, loaded)]
    for _, spec, _ in labelled:
        spec.classifier = exit_classifier_for(loaded, spec)
    vocab_spec = next((s for _, s, _ in labelled if s.ssd is not None and s.ssd.draft_vocab), None)
    draft_ids = draft_vocabulary(loaded, vocab_spec, job.data) if vocab_spec else None
    # Rows: (label, spec, calibration file, steps). Compiled rows run the same modes through
    # compiled steps (DEE's per-layer steps stay eager); the first row, eager full, is the
    # reference every speedup and agreement is measured against. Each further precision
    # adds full decoding on its own copy of the weights (its steps carry its model).
    eager, compiled = Steps(model), Steps(model, compile=True) if job.compile else None
    rows_def = [(label, s, cal, eager) for label, s, cal in labelled]
    if compiled is not None:
        rows_def += [(label + " compiled", s, cal, compiled) for label, s, cal in labelled
                     if s.mode != "dee"]
    main_precision = precision_name(job.dtype, job.quantize)
    others = {}
    for dtype, quantize in map(precision, job.precisions):
        p = precision_name(dtype, quantize)
        if p != main_precision and p not in others:
            others[p] = load_source(job.run, job.checkpoint, job.checkpoint_root, job.model,
                                    device, dtype, quantize)
    loaded_at = {main_precision: loaded, **others}      # every precision's weights
    for p, other in others.items():
        rows_def.append((f"full {p}", ModeSpec("full"), None, Steps(other.model)))
        if job.compile:
            rows_def.append((f"full {p} compiled", ModeSpec("full"), None,
                             Steps(other.model, compile=True)))
    sampling = SamplingConfig(job.temperature)
    # Every generation samples from a generator of its own seeded alike: a second run
    # draws the same tokens.
    run = lambda spec, steps, prompt: decode(steps.model, prompt, job.max_new_tokens, spec,
                                             sampling, generator=torch.Generator(
                                                 prompt.device).manual_seed(job.seed),
                                             draft_ids=(draft_ids if spec.ssd is not None and
                                                        spec.ssd.draft_vocab else None),
                                             steps=steps)
    warmup = {}
    for label, spec, _, steps in progress_bar(rows_def, desc="warm-up (compiles)"):
        # A compiled row decodes every prompt once first: greedy decoding then meets no
        # shape in the timed pass (SSD's verify widths follow acceptance) that it has not
        # compiled, so compile time never counts in tokens/s.
        t0 = time.perf_counter()
        for prompt in prompts if steps.compiled else prompts[:1]:
            run(spec, steps, prompt)
        warmup[label] = time.perf_counter() - t0
    totals = {r[0]: {"stats": DecodeStats(), "agree": 0, "exact": 0, "f1_loss": 0.0,
                     "per_prompt": [], "generated": []} for r in rows_def}
    full_tokens = []
    stream = StreamRead(device)
    with progress_bar(total=len(prompts) * len(rows_def), desc="sweep") as bar:
        for prompt in prompts:
            stream.sample()                 # the floor's denominator, between the rows
            reference = None
            for label, spec, _, steps in rows_def:
                g = run(spec, steps, prompt)
                out, t = g.tokens[0], totals[label]
                if reference is None:
                    reference = out
                    full_tokens.append(reference)
                t["stats"] = t["stats"] + g.stats
                t["per_prompt"].append(g.stats.tokens_per_s)
                t["generated"].append(out)
                t["agree"] += sum(a == b for a, b in zip(out, reference))
                t["exact"] += out == reference
                t["f1_loss"] += f1_loss(out, reference)     # DEE's calibration loss
                bar.update()
    batch = []
    if job.batch_sizes:               # its own prompts: as many as the largest batch needs
        many = replace(job, n_prompts=max(job.n_prompts, *job.batch_sizes))
        batch = batch_rows(job, test_prompts(ids, many, device)[0], compiled or eager)
    slots = cache_size(model, needed)             # every generation's cache (equal lengths)
    widths = [int(k.split(":")[1]) for t in totals.values() for k in t["stats"].calls]
    costs = unit_costs(model, job.prompt_len + job.max_new_tokens // 2, max(widths))
    quality = Quality(loaded, prompts, references)
    rows = []
    precision_of = {id(m.model): p for p, m in loaded_at.items()}
    for label, spec, cal, steps in rows_def:
        t = totals[label]
        st, n = t["stats"], t["stats"].new_tokens
        # Predicted seconds per token: every counted call at its measured unit cost (the
        # unit costs are the main precision's: other precisions predict nothing).
        mine = steps.model is model
        cost = sum(count * costs[key] for key, count in st.calls.items()) / n if mine else None
        rows.append({"mode": label, **spec_fields(spec), "calibration": cal,
                     "precision": precision_of[id(steps.model)],
                     "text_ppl": quality.text_ppl(steps.model) if spec.mode == "full" else None,
                     "compiled": label.endswith(" compiled"),
                     "tokens_per_s": st.tokens_per_s,
                     "tokens_per_s_prompt_mean": statistics.fmean(t["per_prompt"]),
                     "prefill_ms": st.prefill_s / len(prompts) * 1e3,
                     "layers_per_token": st.layer_evals / n, "heads_per_token": st.head_evals / n,
                     "acceptance": st.accepted / st.drafted if st.drafted else None,
                     "accept_hist": st.accept_hist or None,
                     "lookup_share": st.lookup_rounds / st.rounds if spec.ssd and
                     spec.ssd.ngram and st.rounds else None,
                     "exit_rounds": st.exit_rounds or None, "draft_hist": st.draft_hist or None,
                     "mean_exit": st.mean_exit, "exit_hist": st.exit_hist or None,
                     "agreement": t["agree"] / n, "exact_match": t["exact"] / len(prompts),
                     "f1_loss": t["f1_loss"] / len(prompts), **quality(t["generated"]),
                     "cost_s": cost, "warmup_s": warmup[label],
                     "bytes_per_token": bytes_per_token(st.calls, n, steps.model, slots)})
    full = rows[0]
    for r in rows:
        r["gb_per_s"] = r["bytes_per_token"] * r["tokens_per_s"] / 1e9
        r["speedup"] = r["tokens_per_s"] / full["tokens_per_s"]
        r["predicted"] = full["cost_s"] / r["cost_s"] if r["cost_s"] else None
        r["efficiency"] = r["speedup"] / r["predicted"] if r["predicted"] else None
    hf = []
    if job.hf_baseline:
        # generate on the same weights in each float dtype the rows ran in (transformers
        # has no int8 path of its own here: an int8 row compares with its activations' dtype)
        dtypes = {}
        for p, m in loaded_at.items():
            if m.quantize == "none" or m.fmt == "hf":     # (a checkpoint is exported first)
                dtypes.setdefault(precision(p)[0], m)
        for dtype, m in dtypes.items():
            for r in hf_rows(m, prompts, job.max_new_tokens, job.hf_early_exit, full_tokens):
                if len(dtypes) > 1:
                    r["mode"] += f" {dtype}"
                r["family"] = "transformers"
                r["speedup"] = r["tokens_per_s"] / full["tokens_per_s"]
                r.update(quality(r.pop("generated")))
                hf.append(r)
    prefill = []
    if job.prefill_len:
        long_prompt = torch.tensor([ids[:job.prefill_len]], device=device)
        peaks = {}                                 # one matrix peak per dtype
        for p, m in loaded_at.items():
            dtype = m.model.embed_tokens.weight.dtype
            if dtype not in peaks:
                peaks[dtype] = matrix_peak(device, dtype)
            prefill.append({"precision": p, **prefill_speed(m.model, long_prompt, peaks[dtype])})
    ssd = None
    if job.ssd_costs:
        # Priced through the compiled steps when the sweep compiles (their graphs already
        # built), else the eager ones, with the draft vocabulary when the sweep has one;
        # beside the acceptance those rows measured.
        ssd = round_costs(model, compiled or eager, mid, needed, job.draft_layer, job.k,
                          draft_ids if job.draft_vocab else None)
        ssd["measured"] = measured_acceptance(rows, job.compile, bool(job.draft_vocab))
    # Last: measuring the levers compiles the step afresh under each (and resets Dynamo).
    levers = step_levers(model, mid, needed) if job.levers else None
    return {"checkpoint": str(loaded.exits or loaded.source), "device": str(device),
            "threads": torch.get_num_threads(), "prompts": len(prompts),
            "prompt_len": job.prompt_len, "max_new_tokens": job.max_new_tokens,
            "temperature": job.temperature,
            "costs": costs, "rows": rows, "hf": hf, "batch": batch, "levers": levers,
            "ssd_costs": ssd, "prefill": prefill, "weights_bytes": module_bytes(model),
            **stream.summary()}
