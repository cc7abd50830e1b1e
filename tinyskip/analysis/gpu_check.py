"""The checks of ``python -m tinyskip.gpu_check``, one table row each.

A GPU session is short and rare (CI has none), so everything that must be seen on one
runs in one command: the tests marked ``gpu``; the device's streaming read speed; an
8B-shaped Llama (random weights, built on the meta device and materialised on the GPU,
or real weights through the shim's meta-device load) decoding eagerly and compiled, where
a compiled step replays as a CUDA graph (decode/steps.py); SSD on the same model, against
full decoding; and FSDP training steps on every GPU present (training/fsdp_check.py).
Decoding rows report tokens/s and the bytes each token reads over the time it takes, as
a fraction of the streaming read, the way the CPU benchmark does.

Random weights make a draft that agrees with the full model by chance alone: SSD's row
measures what a round costs and that it decodes the full model's tokens, not a speedup.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch._dynamo.utils import counters

from ..bench_jobs import GpuCheckJob
from ..config import SSDConfig
from ..decode import generate, ssd_generate
from ..decode.stats import DecodeStats, Generation
from ..decode.steps import Steps, cache_size
from ..model.transformer import Transformer
from ..runtime import DTYPES, check_runs
from ..storage.hf_llama import load_hf_llama
from .bandwidth import StreamRead, bytes_per_token

TESTS = Path(__file__).resolve().parents[2] / "tests"


@dataclass
class Row:
    check: str
    result: str
    ok: bool = True                 # False: the check failed (the command exits 1)
    figures: dict = field(default_factory=dict)


def gpu_tests(tests: Path = TESTS) -> Row:
    """``pytest -m gpu`` over ``tests`` in a child process; its summary line."""
    if not tests.is_dir():
        return Row("gpu tests", f"no tests folder at {tests} (an editable install has one)",
                   ok=False)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu",
                           "-p", "no:cacheprovider", str(tests)],
                          capture_output=True, text=True, cwd=tests.parent)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    summary = lines[-1].strip("= ") if lines else f"pytest exited {proc.returncode}"
    # Exit 5: no test was selected, which is a failure here too.
    return Row("gpu tests", summary, ok=proc.returncode == 0,
               figures={"returncode": proc.returncode, "s": time.perf_counter() - t0})


def random_model(cfg, device: torch.device, dtype: torch.dtype, seed: int) -> Transformer:
    """A model of ``cfg``'s shape with random weights, built on the meta device and
    materialised once, in ``dtype``, on ``device`` (an 8B model never exists in fp32)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to(dtype).to_empty(device=device)
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)                               # RMSNorm gains
            else:
                p.normal_(0.0, cfg.initializer_range, generator=g)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.reset_rope(device)
    return model.eval()


def load_model(job: GpuCheckJob, device: torch.device) -> tuple[Transformer, Row]:
    dtype = DTYPES[job.dtype]
    check_runs(device, dtype, job.dtype)
    t0 = time.perf_counter()
    if job.model.path:
        model, _ = load_hf_llama(job.model.path, device, dtype)
        what = job.model.path
    else:
        model = random_model(job.model, device, dtype, job.seed)
        what = f"{job.model.name} shape, random weights"
    seconds = time.perf_counter() - t0
    n = sum(p.numel() for p in model.parameters())
    gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    count = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    return model, Row("model", f"{what}: {count} parameters, {job.dtype}, {gb:.1f} GB, "
                               f"ready in {seconds:.1f} s",
                      figures={"parameters": n, "gb": gb, "load_s": seconds})


def stream_row(device: torch.device, mib: int) -> tuple[Row, float]:
    """The device's streaming read (the median of three samples), freed before the model
    is built."""
    read = StreamRead(device, mib)
    bps = statistics.median(read.sample() for _ in range(3))
    del read
    return Row("streaming read", f"{bps / 1e9:.0f} GB/s ({mib} MiB buffer)",
               figures={"gb_per_s": bps / 1e9}), bps


def timed_generations(prompts: list[torch.Tensor], decode: Callable[[torch.Tensor], Generation]
                      ) -> tuple[list[list[int]], DecodeStats, float]:
    """Every prompt's tokens, the statistics of all but the first (which compiled the graphs
    and warmed the device), and the first one's compile seconds."""
    gens = [decode(p) for p in prompts]
    timed = sum((g.stats for g in gens[1:]), DecodeStats())
    return [g.tokens[0] for g in gens], timed, gens[0].stats.compile_s


def decode_rows(model: Transformer, job: GpuCheckJob, device: torch.device,
                stream_bps: float) -> list[Row]:
    g = torch.Generator().manual_seed(job.seed)
    prompts = [torch.randint(0, model.config.vocab_size, (1, job.prompt_len),
                             generator=g).to(device) for _ in range(job.n_prompts)]
    slots = cache_size(model, job.prompt_len + job.max_new_tokens)
    n = job.max_new_tokens
    rows = []

    def row(label: str, stats: DecodeStats, extra: str, figures: dict, ok: bool = True) -> Row:
        tok_s = stats.new_tokens / stats.decode_s
        gbs = bytes_per_token(stats.calls, stats.new_tokens, model, slots) * tok_s / 1e9
        figures = {"tok_per_s": tok_s, "gb_per_s": gbs,
                   "floor_fraction": gbs * 1e9 / stream_bps, **figures}
        return Row(label, f"{tok_s:.1f} tok/s, {gbs:.0f} GB/s = {gbs * 1e9 / stream_bps:.0%} "
                          f"of the streaming read{extra}", ok=ok, figures=figures)

    eager_tokens, stats, _ = timed_generations(
        prompts, lambda p: generate(model, p, n, steps=Steps(model)))
    rows.append(row("full, eager", stats, "", {}))

    full_tokens = eager_tokens
    if job.compile:
        skips = counters["inductor"]["cudagraph_skips"]
        compiled = Steps(model, compile=True)
        full_tokens, stats, compile_s = timed_generations(
            prompts, lambda p: generate(model, p, n, steps=compiled))
        skipped = counters["inductor"]["cudagraph_skips"] - skips
        same = agreement(full_tokens, eager_tokens)
        graphs = ("CUDA graphs" if device.type == "cuda" and compiled.compiled else
                  "compiled" if compiled.compiled else "compile unavailable: eager")
        rows.append(row(f"full, {graphs}", stats,
                        f"; compile {compile_s:.0f} s; {skipped} graphs skipped; "
                        f"tokens = eager's: {same:.0%}",
                        {"compile_s": compile_s, "cudagraph_skips": skipped,
                         "agreement_with_eager": same},
                        ok=compiled.compiled and skipped == 0
                        and parts_at_near_ties(model, prompts, eager_tokens, full_tokens)))

    cfg = SSDConfig(job.draft_layer, job.k)
    ssd_tokens, stats, compile_s = timed_generations(
        prompts, lambda p: ssd_generate(model, p, n, cfg, steps=Steps(model, job.compile)))
    same = agreement(ssd_tokens, full_tokens)
    accept = stats.accepted / max(stats.drafted, 1)
    full = rows[-1]
    speedup = stats.new_tokens / stats.decode_s / full.figures["tok_per_s"]
    rows.append(row(f"ssd E={job.draft_layer} k={job.k}" + (", compiled" if job.compile else ""),
                    stats, f"; {speedup:.2f}x {full.check}; acceptance {accept:.2f}; "
                           f"compile {compile_s:.0f} s; tokens = full's: {same:.0%}",
                    {"speedup": speedup, "acceptance": accept, "compile_s": compile_s,
                     "agreement_with_full": same},
                    ok=parts_at_near_ties(model, prompts, full_tokens, ssd_tokens,
                                          exact=job.dtype == "float32")))
    return rows


def parts_at_near_ties(model: Transformer, prompts: list[torch.Tensor], want: list[list[int]],
                       got: list[list[int]], exact: bool = False, rel: float = 0.02) -> bool:
    """Whether each generation in ``got`` equals the one in ``want`` up to where they part,
    and parts only where the model's top two next-token logits lie within ``rel`` of the
    larger (scored over the shared prefix): in bf16, products over k+1 rows round otherwise
    than one row's, so near-ties may flip; with ``exact`` (fp32), they must not part."""
    for prompt, a, b in zip(prompts, want, got):
        i = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if i is None:
            if len(a) != len(b):
                return False
            continue
        if exact:
            return False
        ids = torch.cat([prompt[0], torch.tensor(a[:i], device=prompt.device)])[None]
        with torch.no_grad():
            top = model(ids)[0, 0, -1].float().topk(2).values           # (2,)
        if top[0] - top[1] > rel * top[0].abs():
            return False
    return True


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """The fraction of positions where two sets of generations hold the same token (a
    shorter generation's missing positions count as different)."""
    same = total = 0
    for x, y in zip(a, b):
        total += max(len(x), len(y))
        same += sum(p == q for p, q in zip(x, y))
    return same / max(total, 1)


def fsdp_settings(job: GpuCheckJob) -> dict:
    """The FSDP row's run: the first ``fsdp_layers`` blocks of the model's shape with a
    32k vocabulary (1.1B parameters for the 8B shape: its fp32 weights and AdamW moments,
    18 GB, fit one GPU, and shard over several), LayerSkip's recipe (LayerDrop, every
    exit's loss), bf16 on a GPU."""
    shape = dataclasses.asdict(job.model)
    shape.update(num_hidden_layers=min(job.fsdp_layers, job.model.num_hidden_layers),
                 vocab_size=min(job.model.vocab_size, 32000), path=None, rope_scaling=None)
    cuda = job.device == "cuda"
    train = {"preset": "layerskip", "batch_size": 8, "seq_len": 512 if cuda else 32,
             "max_steps": 100, "warmup_steps": 2, "lr": 3e-4, "layerdrop_p_max": 0.2,
             "exit_weighting": "linear", "bf16": cuda, "device": job.device}
    return {"model": shape, "train": train, "steps": job.fsdp_steps, "device": job.device}


def fsdp_row(job: GpuCheckJob) -> Row:
    """``fsdp_check`` under torchrun on every GPU present (two CPU processes with
    device=cpu); its JSON line as a row."""
    n = torch.cuda.device_count() if job.device == "cuda" else 2
    with tempfile.TemporaryDirectory() as folder:
        settings = Path(folder) / "fsdp_check.json"
        settings.write_text(json.dumps(fsdp_settings(job)))
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc_per_node={n}", "-m", "tinyskip.training.fsdp_check",
                               str(settings)], capture_output=True, text=True, timeout=900)
    lines = proc.stdout.strip().splitlines()
    label = f"fsdp, {n} x {'GPU' if job.device == 'cuda' else 'CPU process'}"
    if proc.returncode != 0 or not lines:
        err = [line for line in proc.stderr.splitlines() if line.strip()]
        return Row(label, f"failed (exit {proc.returncode}): {err[-1] if err else ''}"[:300],
                   ok=False)
    r = json.loads(lines[-1])
    first, last = r["losses"][0], r["losses"][-1]
    peak = f", peak {r['peak_gb']:.1f} GB per GPU" if r["peak_gb"] is not None else ""
    return Row(label, f"{r['parameters'] / 1e6:.0f}M parameters, loss {first:.3f} -> {last:.3f} "
                      f"over {len(r['losses'])} steps, {r['step_s']:.2f} s/step, "
                      f"{r['tokens_per_s']:.0f} tokens/s{peak}",
               # One batch learnt again and again: its loss falls if the shards step.
               ok=last < first, figures=r)


def run_checks(job: GpuCheckJob, tests: Path = TESTS) -> list[Row]:
    device = torch.device(job.device)
    rows = [gpu_tests(tests)] if job.tests else []
    row, bps = stream_row(device, job.stream_mib)
    rows.append(row)
    model, row = load_model(job, device)
    SSDConfig(job.draft_layer, job.k).validate(model.num_layers)   # before minutes of decoding
    rows.append(row)
    rows += decode_rows(model, job, device, bps)
    del model
    if job.fsdp:
        rows.append(fsdp_row(job))
    return rows


def format_table(rows: list[Row]) -> str:
    width = max(len(r.check) for r in rows)
    lines = [f"{'check':<{width}}  ok    result", "-" * (width + 60)]
    lines += [f"{r.check:<{width}}  {'yes' if r.ok else 'NO ':<4}  {r.result}" for r in rows]
    return "\n".join(lines)
