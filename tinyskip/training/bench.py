"""The training benchmark behind ``python -m tinyskip.train_bench``: the plain and
layerskip presets' training steps, side by side in one process, against the machine's
measured matmul peak.

Each preset trains a fresh model of the same shape with the trainer's own step
(``trainer.train_step``) on real batches. The timed steps are spread evenly over the
preset's schedule (LayerDrop's rate and the rotating exit set change with the step, so
the mean is the whole run's), and the presets alternate round by round so that drift
in machine speed hits both alike.

Model FLOPs, counted from what each step ran: 6 per weight per token for every block on
every row it ran on (LayerDrop skips rows), 12 * T * d per token per block for
attention's two products, and 6 * d * V for every token the shared head scored, at
every exit. The fused loss' recomputation is not counted (utilisation of the model's
work, not of the hardware). The peak is a large square product in bf16 (and fp32),
measured by the same command. Next to the step's time: its products alone at their
shapes (``step_products``), the floor the step's matrix work sets on this machine, and
the utilisation that floor would reach: what no removal of overhead can exceed.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from ..config import ModelConfig, TrainConfig
from ..bench_jobs import TrainBenchJob
from ..model.transformer import Transformer
from ..runtime import matrix_peak, median_seconds, pick_device, resolve_bf16
from ..storage.data import get_batch, prepare_corpus
from .optim import cosine_lr, make_optimizer
from .trainer import ExitObjective, StepWork, compile_blocks, train_step


def step_flops(model: Transformer, work: StepWork, seq_len: int) -> float:
    """Model FLOPs of one training step (forward and backward), from what it ran
    (recomputation not counted: the distillation teacher's logits are the last exit's)."""
    cfg: ModelConfig = model.config
    block_weights = sum(p.numel() for p in model.layers[0].parameters() if p.dim() == 2)
    per_token_block = 6 * block_weights + 12 * seq_len * cfg.hidden_size
    return (sum(work.block_rows) * seq_len * per_token_block
            + work.head_rows * 6 * cfg.hidden_size * cfg.vocab_size)


def step_products(model: Transformer, block_rows: list[int], head_rows: int, seq_len: int,
                  dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random operands of one training step's model products at their shapes, forward
    and backward, exactly the FLOPs ``step_flops`` counts: per block, each weight's three
    products (x W^T, g W, g^T x) on the tokens of the rows it ran on and attention's six
    batched (T x T) products per query head; the head's three on the tokens it scored.
    Operands of one shape are one tensor (memory grows with the distinct shapes only)."""
    cfg: ModelConfig = model.config
    dev = model.embed_tokens.weight.device
    T, H, V = seq_len, cfg.num_attention_heads, cfg.vocab_size
    hd = cfg.hidden_size // H
    operands: dict[tuple[int, ...], torch.Tensor] = {}

    def mk(*shape: int) -> torch.Tensor:
        if shape not in operands:
            operands[shape] = torch.randn(*shape, device=dev).to(dtype)
        return operands[shape]

    def linear(n: int, w_out: int, w_in: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(mk(n, w_in), mk(w_in, w_out)),      # forward: x W^T
                (mk(n, w_out), mk(w_out, w_in)),     # grad of x: g W
                (mk(w_out, n), mk(n, w_in))]         # grad of W: g^T x

    pairs = []
    shapes = [m.weight.shape for m in model.layers[0].modules() if isinstance(m, torch.nn.Linear)]
    for rows in block_rows:
        if rows == 0:
            continue
        for w_out, w_in in shapes:
            pairs += linear(rows * T, w_out, w_in)
        b = rows * H                                  # (rows * H) batched per-head products
        # Forward Q K^T and P V; backward dO V^T, P^T dO, dS K and dS^T Q.
        pairs += [(mk(b, T, hd), mk(b, hd, T))] * 2 + [(mk(b, T, T), mk(b, T, hd))] * 4
    return pairs + linear(head_rows, V, cfg.hidden_size)


def matrix_seconds(pairs: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                   reps: int = 5) -> float:
    """Median time of the products alone, one after another, each into an output made
    beforehand (one per shape): the step's matrix-work floor, what it would take if
    everything between the products were free."""
    outs: dict[tuple[int, ...], torch.Tensor] = {}
    jobs = []
    for a, b in pairs:
        shape = (*a.shape[:-1], b.shape[-1])
        if shape not in outs:
            outs[shape] = a.new_empty(shape)
        jobs.append((a, b, outs[shape]))

    def products() -> None:
        for a, b, out in jobs:
            torch.matmul(a, b, out=out)

    return median_seconds(products, reps, device)


def preset_configs(job: TrainBenchJob) -> dict[str, TrainConfig]:
    shared = {k: getattr(job, k) for k in ("batch_size", "seq_len", "bf16", "compile")
              if getattr(job, k) is not None}
    return {name: dataclasses.replace(getattr(job, name), **shared)
            for name in ("plain", "layerskip")}


def bench_training(job: TrainBenchJob) -> dict:
    if job.threads:
        torch.set_num_threads(job.threads)
    device = pick_device(job.device)
    corpus = prepare_corpus(job.data)
    cfg = dataclasses.replace(job.model, vocab_size=corpus.vocab_size,
                              bos_token_id=corpus.bos_id, eos_token_id=corpus.eos_id)
    runs, timed = {}, job.steps * job.rounds
    for name, tc in preset_configs(job).items():
        tc = resolve_bf16(tc, device)
        torch.manual_seed(tc.seed)
        model = Transformer(cfg).to(device).train()
        # Whether the blocks did compile: a fallback to eager shows in the row.
        compiled = compile_blocks(model) if tc.compile else False
        schedule = [round(i * tc.max_steps / timed) for i in range(timed)]
        runs[name] = {"tc": tc, "model": model, "objective": ExitObjective(model, tc, compiled),
                      "opt": make_optimizer(model, tc),
                      "schedule": schedule, "time": 0.0, "tokens": 0, "flops": 0.0,
                      "block_rows": [0] * cfg.num_hidden_layers, "head_rows": 0,
                      "compiled": compiled}

    def one_step(run: dict, step: int) -> tuple[float, StepWork]:
        tc = run["tc"]
        t0 = time.perf_counter()
        for group in run["opt"].param_groups:
            group["lr"] = cosine_lr(tc, step)
        x, y = get_batch(corpus.tokens["train"], tc.batch_size, tc.seq_len, tc.seed, step)
        work = train_step(run["objective"], run["opt"], tc, x.to(device), y.to(device), step)
        work.loss.item()                        # waits for the step, as the trainer does
        return time.perf_counter() - t0, work

    for run in runs.values():                   # warm-up (and compilation): untimed
        for step in run["schedule"][:job.warmup]:
            one_step(run, step)
    for r in range(job.rounds):
        for run in runs.values():
            for step in run["schedule"][r::job.rounds]:
                seconds, work = one_step(run, step)
                run["time"] += seconds
                run["tokens"] += run["tc"].batch_size * run["tc"].seq_len
                run["flops"] += step_flops(run["model"], work, run["tc"].seq_len)
                run["block_rows"] = [a + b for a, b in zip(run["block_rows"], work.block_rows)]
                run["head_rows"] += work.head_rows

    peaks = {"bf16": matrix_peak(device, torch.bfloat16, job.peak_size),
             "fp32": matrix_peak(device, torch.float32, job.peak_size)}
    rows = []
    for name, run in runs.items():
        tc = run["tc"]
        rate = run["flops"] / run["time"]
        # The mean step's products alone, in the dtype the step multiplies in, against
        # that dtype's peak.
        kind = "bf16" if tc.bf16 else "fp32"
        pairs = step_products(run["model"], [round(r / timed) for r in run["block_rows"]],
                              round(run["head_rows"] / timed), tc.seq_len,
                              torch.bfloat16 if tc.bf16 else torch.float32)
        matrix = matrix_seconds(pairs, device)
        matrix_flops = sum(2 * a.numel() * b.shape[-1] for a, b in pairs)
        rows.append({"preset": name, "tokens_per_s": run["tokens"] / run["time"],
                     "ms_per_step": 1e3 * run["time"] / timed,
                     "gflop_per_step": run["flops"] / timed / 1e9,
                     "gflop_per_s": rate / 1e9, "mfu_bf16": rate / peaks["bf16"],
                     # The step's model FLOPs at the bf16 peak: its time if nothing but
                     # matrix work at full speed were left.
                     "floor_ms": 1e3 * run["flops"] / timed / peaks["bf16"],
                     "mfu_fp32": rate / peaks["fp32"],
                     # The products alone: the step's time if nothing else cost anything,
                     # and the utilisation that would reach.
                     "matrix_ms": 1e3 * matrix, "mfu_matrix": matrix_flops / matrix / peaks[kind],
                     "bf16": tc.bf16, "compile": run["compiled"],
                     "batch_size": tc.batch_size, "seq_len": tc.seq_len,
                     "exit_token_fraction": tc.exit_token_fraction})
    plain = rows[0]["tokens_per_s"]
    for row in rows:
        row["vs_plain"] = row["tokens_per_s"] / plain
    return {"model": cfg.name, "threads": torch.get_num_threads(), "device": str(device),
            "peak_gflop_per_s": {k: v / 1e9 for k, v in peaks.items()}, "rows": rows}


def format_table(result: dict) -> str:
    peaks = result["peak_gflop_per_s"]
    lines = [f"{result['model']} on {result['device']}, {result['threads']} threads; matmul peak "
             f"{peaks['bf16']:.0f} GFLOP/s bf16, {peaks['fp32']:.0f} fp32",
             "| preset | tokens/s | vs plain | ms/step | matrix work alone ms | floor ms (bf16 peak) "
             "| GFLOP/step | GFLOP/s | MFU (bf16 peak) | MFU (fp32 peak) "
             "| MFU of the matrix work alone (its dtype's peak) |", "|---" * 11 + "|"]
    for r in result["rows"]:
        lines.append(f"| {r['preset']} | {r['tokens_per_s']:.0f} | {r['vs_plain']:.2f}x "
                     f"| {r['ms_per_step']:.1f} | {r['matrix_ms']:.1f} | {r['floor_ms']:.1f} "
                     f"| {r['gflop_per_step']:.2f} | {r['gflop_per_s']:.1f} "
                     f"| {r['mfu_bf16']:.1%} | {r['mfu_fp32']:.1%} | {r['mfu_matrix']:.1%} |")
    return "\n".join(lines)
