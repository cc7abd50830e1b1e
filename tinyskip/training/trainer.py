"""The training loop: LayerDrop, early-exit losses, evaluation, checkpoints, DDP or FSDP.

Data order and LayerDrop draws are functions of (seed, step, rank), so a resumed run
replays exactly what the uninterrupted run would have done, with no RNG state to save.
Data-parallel runs (``torchrun``) split each global batch of ``train.batch_size`` rows
between the ranks, so the loss curve matches one process with the same global batch;
``train.parallel=fsdp`` also shards the weights and optimizer state (sharding.py).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..analysis.perplexity import exit_perplexities
from ..atomic import append_text, make_dirs, write_json_atomic
from ..config import ConfigError, TrainConfig
from ..jobs import TrainJob
from ..model.transformer import Transformer
from ..runtime import autocast, pick_device, progress_bar, resolve_bf16
from ..storage.checkpoint import (CHECKPOINT, build_model, load_model, load_model_config,
                                  load_train_state, resolve_checkpoint, run_folder,
                                  save_checkpoint)
from ..storage.data import Corpus, get_batch, prepare_corpus
from ..storage.sharded_checkpoint import load_shards, save_sharded
from ..tb_log import ScalarLog, eval_scalars, require_tensorboard
from .continual import check_origin, prepare_continual
from .distributed import init_distributed, launched_world, rank_mean
from .losses import exit_weights, layerdrop_probs, sampled_exit_loss
from .optim import cosine_lr, make_optimizer
from .result import TrainResult
from .resume import check_fresh, check_layout, check_model, check_recipe, truncate_metrics
from .sharding import gather_state, is_sharded, shard


def _prepare_run(job: TrainJob, run_dir: Path, ckpt: Path | None, sharded: bool):
    """The job as it runs, the model, its corpus, the optimizer state and start step
    (None: fresh, else resumed from ``ckpt``) and ``save(model, train_state, also=None)``,
    the checkpoint writer: from scratch here, from a pretrained model in continual.py."""
    if ckpt is not None:
        check_origin(job, ckpt, run_dir)
    if job.model.path:
        return prepare_continual(job, run_dir, ckpt, sharded)
    tc = job.train
    if ckpt is not None:
        # Cheap checks before the data is loaded: the model, then the recipe.
        check_model(job, load_model_config(ckpt), run_dir)
        check_recipe(job, run_dir)
        state = load_train_state(ckpt, sharded)
        model, _ = load_model(ckpt)
        corpus = prepare_corpus(job.data, ckpt / "tokenizer.model")
        return job, model, corpus, state, _saver(run_dir, corpus)
    check_fresh(run_dir, tc)
    corpus = prepare_corpus(job.data)
    cfg = dataclasses.replace(job.model, vocab_size=corpus.vocab_size,
                              bos_token_id=corpus.bos_id, eos_token_id=corpus.eos_id)
    torch.manual_seed(tc.seed)          # the same initial weights on every rank
    return job, Transformer(cfg), corpus, None, _saver(run_dir, corpus)


def _saver(run_dir: Path, corpus: Corpus):
    def save(model: Transformer, train_state: dict, also=None) -> None:
        save_checkpoint(run_dir, model, corpus.tokenizer_file, train_state, also)
        # Later saves copy the tokenizer from the checkpoint just published: a run
        # resumed from .checkpoint-old loses that folder at its first save.
        corpus.tokenizer_file = run_dir / CHECKPOINT / "tokenizer.model"
    return save


@dataclass
class StepWork:
    """What one training step ran: its loss, and the work a FLOP count needs."""

    loss: torch.Tensor              # weighted total (detached)
    per_exit: torch.Tensor          # (n_exits,) mean CE of each exit run (detached)
    block_rows: list[int]           # sequences each block ran on (LayerDrop skips rows)
    head_rows: int                  # tokens the shared head scored, over every exit


class ExitObjective(torch.nn.Module):
    """The model and its early-exit loss as one module, so that a data-parallel wrapper
    sees every weight used inside its forward: an untied ``lm_head`` read by a loss
    outside it counts as unused there, and its gradient then arrives twice.
    ``compiled``: the distillation's elementwise kernels go through torch.compile (set
    where the blocks compiled, so a fallback to eager blocks is eager here too)."""

    def __init__(self, model: Transformer, tc: TrainConfig, compiled: bool = False):
        super().__init__()
        self.model, self.tc, self.compiled = model, tc, compiled

    def forward(self, x: torch.Tensor, y: torch.Tensor, exits: list[int],
                weights: torch.Tensor, probs: list[float], draws: torch.Tensor,
                generator: torch.Generator, rows: slice = slice(None),
                called: list[bool] | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(weighted loss, per-exit mean CE, tokens the head scored over every exit)."""
        tc = self.tc
        states = self.model(x, exits, probs, draws, head=False, called=called)
        return sampled_exit_loss(states, self.model.lm_head.weight, y, weights,
                                 tc.exit_token_fraction, generator, rows, tc.batch_size,
                                 tc.distill_weight, tc.distill_temperature, self.compiled)


def train_step(objective: torch.nn.Module, optimizer: torch.optim.Optimizer, tc: TrainConfig,
               x: torch.Tensor, y: torch.Tensor, step: int, rows: slice = slice(None),
               rank: int = 0) -> StepWork:
    """One optimisation step of the LayerSkip recipe (LayerDrop, early-exit losses) on the
    batch x, y (B, T); ``objective``: an ``ExitObjective`` (or its data-parallel wrapper);
    ``rows``: this rank's rows of the global batch.

    Every random draw is a function of (seed, step, rank), so a resumed run replays what
    the uninterrupted run did: LayerDrop and the exits' token subsets from a generator of
    the global batch (each rank keeps its rows' share, as one process would), and dropout
    from torch's generator reseeded per (seed, step, rank). (Compiled blocks draw dropout
    masks from inductor's own stream: a resume that toggles ``train.compile`` with
    dropout on continues correctly but not bit for bit.)
    """
    model = objective.module.model if hasattr(objective, "module") else objective.model
    L = model.num_layers
    exits, weights = exit_weights(tc, L, step)
    g = torch.Generator().manual_seed(tc.seed * 7919 + step * 131)
    all_draws = torch.rand(tc.batch_size, L, generator=g)
    draws = all_draws[rows]
    probs = layerdrop_probs(tc, L, step)
    # Sharded blocks gather their weights with every rank: each rank calls the blocks any
    # row of the global batch keeps, on no rows where its own rows all skip one.
    called = (all_draws >= torch.tensor(probs)).any(0).tolist() if is_sharded(objective) \
        else None
    # Python hashes tuples of ints the same in every process (PYTHONHASHSEED only salts
    # strings): distinct masks per (seed, step, rank), whatever the number of ranks.
    torch.manual_seed(hash((tc.seed, step, rank)) & (2 ** 63 - 1))
    with autocast(x.device, tc.bf16):
        loss, per_exit, head_rows = objective(x, y, exits, weights, probs, draws, g, rows,
                                              called)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if tc.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    optimizer.step()
    # Blocks past the deepest exit never run (block l feeds exit l + 1); a row skips block
    # l when its draw < p_l.
    block_rows = [int((draws[:, l] >= probs[l]).sum()) if l < exits[-1] else 0
                  for l in range(L)]
    return StepWork(loss.detach(), per_exit.detach(), block_rows, head_rows)


def compile_blocks(model: Transformer) -> bool:
    """``train.compile``: each block and the final norm compiled in place (one graph
    serves all the blocks, the weights being its inputs; the row count is dynamic).
    LayerDrop's row selection, the exit set and the loss stay in Python, so a new exit
    set or drop rate never recompiles, and the state dict keeps its names.

    Where torch.compile cannot build code (no C++ compiler, an unsupported device) the
    blocks train eagerly after one warning line; returns whether they were compiled. The
    probe is a one-line graph: it catches a missing tool chain, not every way the blocks'
    own graph could fail."""
    device = model.embed_tokens.weight.device
    try:
        # A one-line graph on the training device: a missing compiler fails here, not in
        # the middle of the first step's forward.
        torch.compile(lambda t: t * 2 + 1, fullgraph=True)(torch.ones(2, device=device))
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        warnings.warn(f"torch.compile is unavailable here ({type(e).__name__}: {reason}): "
                      "training eagerly", stacklevel=2)
        return False
    for layer in model.layers:
        layer.compile(dynamic=True)
    # The final norm reads every exit's states (n_exits, B, T, d): eager, its fp32 ops and
    # their backward cost the layerskip step about 10 ms at l6_d192, batch 32.
    model.norm.compile(dynamic=True)
    return True


def train(job: TrainJob, progress: bool = True) -> TrainResult:
    tc = job.train
    if tc.preset == "balcony":
        raise ConfigError("train=balcony trains exit modules on a frozen backbone: "
                          "training.exit_training.train_exit_modules runs it")
    if tc.tensorboard:
        require_tensorboard("train.tensorboard")
    device = pick_device(tc.device)
    job = dataclasses.replace(job, train=resolve_bf16(tc, device))
    tc = job.train
    run_dir = run_folder(job.checkpoint_root, job.run_name)
    launched_world(tc)
    ckpt = resolve_checkpoint(run_dir) if tc.resume else None
    sharded = ckpt is not None and check_layout(ckpt, tc)
    fsdp = tc.parallel == "fsdp"
    rank, world = init_distributed(device, group=fsdp)
    if device.type == "cuda" and dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device())
    job, model, corpus, state, save = _prepare_run(job, run_dir, ckpt, sharded)
    model.to(device).train()
    # Recorded with every evaluation: a fallback to eager blocks shows in the run's metrics.
    compiled = compile_blocks(model) if tc.compile else False
    objective = ExitObjective(model, tc, compiled)
    if fsdp:
        shard(objective, model.layers, tc)
    elif world > 1:
        objective = torch.nn.parallel.DistributedDataParallel(
            objective, find_unused_parameters=tc.layerdrop_p_max > 0)
    optimizer = make_optimizer(model, tc)       # after sharding: it steps the shards
    start = 0
    if state is not None:
        if sharded:     # into any layout: this run's shards, or whole weights
            load_shards(ckpt, model, optimizer)
        else:
            optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
    metrics_path = run_dir / "metrics.jsonl"
    tb = None
    if rank == 0:
        make_dirs(run_dir)
        write_json_atomic(run_dir / "job.json", dataclasses.asdict(job))
        if state is None and metrics_path.exists():     # a fresh run starts its own log
            metrics_path.unlink()
        truncate_metrics(metrics_path, start)
        if tc.tensorboard:
            tb = ScalarLog(run_dir, purge_step=start + 1)

    result = TrainResult(run_dir, start)
    rows = slice(rank, None, world)
    seen_tokens = state["tokens_seen"] if state else 0
    train_time, train_tokens, window_losses = 0.0, 0, []
    bar = None
    if progress and rank == 0:
        bar = progress_bar(total=tc.max_steps, initial=start, desc=f"train {job.run_name}")
    for step in range(start, tc.max_steps):
        t0 = time.perf_counter()
        lr = cosine_lr(tc, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch(corpus.tokens["train"], tc.batch_size, tc.seq_len, tc.seed, step, rows)
        out = train_step(objective, optimizer, tc, x.to(device, non_blocking=True),
                         y.to(device, non_blocking=True), step, rows, rank)
        loss, per_exit = out.loss, out.per_exit
        loss_value = loss.item()
        train_time += time.perf_counter() - t0
        train_tokens += x.numel() * world
        seen_tokens += x.numel() * world
        result.losses.append(loss_value)
        window_losses.append(per_exit[-1].item())
        result.step = step + 1
        if bar is not None:
            bar.update(1)
            if step % tc.log_every == 0:
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{train_tokens / train_time:.0f}")
        if tb is not None and (step + 1) % tc.log_every == 0:
            # Rank 0's loss over the steps since the last point (a resumed run's first
            # window may be shorter); LayerDrop's p_l at this step, deepest and mean (the
            # expected fraction of blocks a row skips).
            probs = layerdrop_probs(tc, model.num_layers, step)
            tb.scalars(step + 1, {"train/loss": statistics.fmean(result.losses[-tc.log_every:]),
                                  "train/lr": lr, "train/tokens_per_s": train_tokens / train_time,
                                  "train/layerdrop_max": max(probs),
                                  "train/layerdrop_mean": statistics.fmean(probs)})
        last = step + 1 == tc.max_steps
        evaluating = (step + 1) % tc.eval_every == 0 or last
        saving = (step + 1) % tc.save_every == 0 or last
        # What rank 0 evaluates and saves: under fsdp, a whole copy gathered from the shards.
        whole = model
        if fsdp and (evaluating or saving):
            gathered = gather_state(model)
            whole = build_model(model.config, gathered, device).to(device) if rank == 0 else None
        if evaluating:
            window = rank_mean(torch.tensor(sum(window_losses) / len(window_losses),
                                            dtype=torch.float64, device=device), world)
            if rank == 0:
                ev = exit_perplexities(whole, corpus.tokens["validation"],
                                       corpus.words["validation"], tc.seq_len, tc.batch_size,
                                       tc.eval_batches, tc.bf16)
                result.last_eval = {
                    "step": step + 1, "tokens": seen_tokens, "lr": lr,
                    "train_loss": window.item(),
                    "tokens_per_s": train_tokens / train_time, "compiled_blocks": compiled,
                    "val_loss": ev["loss"], "val_word_ppl": ev["word_ppl"],
                    "val_agreement": ev["agreement"], "val_p_last_top": ev["p_last_top"]}
                append_text(metrics_path, json.dumps(result.last_eval) + "\n")
                if tb is not None:
                    tb.scalars(step + 1, eval_scalars(result.last_eval))
                    tb.flush()          # an evaluation shows in TensorBoard at once
                if bar is not None:
                    bar.write(f"step {step + 1}: val loss by exit "
                              + " ".join(f"{v:.2f}" for v in ev["loss"])
                              + f" | word ppl (last) {ev['word_ppl'][-1]:.1f}")
            window_losses = []
            model.train()
        if saving and tb is not None:   # what the checkpoint covers is on disk before it
            tb.flush()
        progress_state = {"step": step + 1, "tokens_seen": seen_tokens}
        if saving and fsdp:
            save_sharded(lambda also: save(whole, progress_state, also), model, optimizer)
        elif saving and rank == 0:
            save(model, {**progress_state, "optimizer": optimizer.state_dict()})
        if world > 1 and evaluating:
            dist.barrier()
    if bar is not None:
        bar.close()
    if tb is not None:
        tb.close()
    return result
