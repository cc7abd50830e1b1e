"""Training exit modules on a frozen backbone (Balcony): ``train=balcony``.

Only the modules train; the backbone (blocks, norm, tied head) never changes. Loss per
step: ``kl_weight`` * mean over exits of KL(p_final || p_exit) at temperature
``distill_temperature`` + ``ce_weight`` * mean over exits of the next-token CE.

``exit_cache=online`` runs the frozen backbone on every batch; ``offline`` reads its
states from a hidden-state cache built once (hidden_cache.py), so training never runs
the backbone. Both see the same batches (a function of seed and step) and compute the
same loss from the same states. Resume, atomic saves, metrics.jsonl and torchrun data
parallelism (ddp or fsdp) work as in the backbone trainer. Under fsdp only the modules
are sharded: the frozen backbone has no gradients or optimizer state to shard, and
stays whole on every rank (sharding it would save its memory for an all-gather of every
block at every step; with exit_cache=offline it does not even run).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..analysis.perplexity import exit_perplexities
from ..atomic import append_text, make_dirs, write_json_atomic
from ..config import ConfigError, TrainConfig
from ..jobs import TrainJob
from ..model.exit_modules import ExitModules, check_exit_layers
from ..model.transformer import Transformer
from ..runtime import autocast, pick_device, progress_bar, resolve_bf16
from ..storage.checkpoint import CHECKPOINT, CheckpointError, load_train_state, run_folder
from ..storage.data import get_batch
from ..storage.exit_checkpoint import EXITS, exits_folder, load_exit_modules, save_exit_modules
from ..storage.loading import Loaded, corpus_of, load_backbone, run_data_config
from ..storage.sharded_checkpoint import load_shards, save_sharded
from ..tb_log import ScalarLog, eval_scalars, require_tensorboard
from .distributed import init_distributed, launched_world, rank_mean
from .hidden_cache import cache_key, cache_meta, open_or_build
from .losses import early_exit_loss, exit_kl
from .optim import cosine_lr, make_optimizer
from .result import TrainResult
from .resume import check_layout, check_recipe, truncate_metrics
from .sharding import gather_state, shard


def default_exit_layers(num_layers: int) -> list[int]:
    """Exits at a quarter, half and three quarters of the depth (distinct, 1..L-1)."""
    return sorted({min(max(round(num_layers * f), 1), num_layers - 1) for f in (0.25, 0.5, 0.75)})


def backbone_states(model: Transformer, x: torch.Tensor, exits: list[int]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen backbone on tokens x (B, T): states at the exits (n, B, T, d) and the
    last block's output (B, T, d)."""
    with torch.no_grad():
        h, states = model.embed(x), []
        start = 0
        for e in exits + [model.num_layers]:
            h = model.run_layers(h, start, e)
            states.append(h)
            start = e
    return torch.stack(states[:-1]), states[-1]


def exit_module_loss(model: Transformer, states: torch.Tensor, last: torch.Tensor,
                     y: torch.Tensor, exits: list[int], tc: TrainConfig
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss and the per-exit KL (n,), from the backbone's states."""
    student = [model.head_at(states[i], e) for i, e in enumerate(exits)]    # n x (B, T, V)
    with torch.no_grad():
        teacher = model.head(last)                                            # (B, T, V)
    logits = torch.stack(student + [teacher])                                 # (n+1, B, T, V)
    kl = exit_kl(logits, tc.distill_temperature)
    loss = tc.kl_weight * kl.mean()
    if tc.ce_weight > 0:
        weights = torch.ones(len(exits), device=logits.device) / len(exits)
        loss = loss + tc.ce_weight * early_exit_loss(logits[:-1], y, weights)[0]
    return loss, kl.detach()


class ModulesObjective(torch.nn.Module):
    """The exit modules and their loss as one module, the root FSDP shards (its forward
    is where the modules' weights are gathered). The backbone stays outside the module
    tree: never sharded, never in the modules' state dict."""

    def __init__(self, modules: ExitModules, model: Transformer, tc: TrainConfig):
        super().__init__()
        self.exit_modules, self.tc = modules, tc
        object.__setattr__(self, "backbone", model)

    def forward(self, states: torch.Tensor, last: torch.Tensor, y: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return exit_module_loss(self.backbone, states, last, y, self.exit_modules.exit_layers,
                                self.tc)


def _backbone(job: TrainJob, device) -> tuple[Loaded, dict]:
    tc = job.train
    if job.model.path and tc.backbone:
        raise ConfigError("give the backbone once: train.backbone=<run> or model=hf_llama "
                          "model.path=..., not both")
    if job.model.path:
        loaded = load_backbone(job.model.path, "hf", device, "bfloat16" if device.type == "cuda"
                               else "float32")
        fmt = "hf"
    elif tc.backbone:
        folder = Path(tc.backbone)
        if not folder.exists():
            folder = run_folder(job.checkpoint_root, tc.backbone)
        if exits_folder(folder) is not None:
            raise ConfigError(f"train.backbone={tc.backbone!r} is itself an exit-module run: "
                              "give the run it was trained on")
        loaded = load_backbone(str(folder), "tinyskip", device)
        fmt = "tinyskip"
    else:
        raise ConfigError("train=balcony trains exit modules on a frozen backbone: give "
                          "train.backbone=<run> (or model=hf_llama model.path=...)")
    ref = {"path": str(Path(loaded.source).resolve()), "format": fmt,
           "weights_hash": loaded.weights_hash()}
    return loaded, ref


def train_exit_modules(job: TrainJob, progress: bool = True) -> TrainResult:
    tc = job.train
    if tc.tensorboard:
        require_tensorboard("train.tensorboard")
    device = pick_device(tc.device)
    job = dataclasses.replace(job, train=resolve_bf16(tc, device))
    tc = job.train
    launched_world(tc)
    run_dir = run_folder(job.checkpoint_root, job.run_name)
    folder = exits_folder(run_dir) if tc.resume else None
    if tc.resume and folder is None:
        raise CheckpointError(f"train.resume=true but {run_dir} holds no exit modules")
    sharded = folder is not None and check_layout(folder, tc)
    fsdp = tc.parallel == "fsdp"
    rank, world = init_distributed(device, group=fsdp)
    loaded, ref = _backbone(job, device)
    model = loaded.model.requires_grad_(False).eval()
    L, ctx = model.num_layers, model.config.max_position_embeddings
    if tc.seq_len > ctx:
        raise ConfigError(f"train.seq_len={tc.seq_len}: longer than the backbone's context "
                          f"(max_position_embeddings={ctx})")
    exits = sorted(tc.exit_layers) if tc.exit_layers else default_exit_layers(L)
    check_exit_layers(exits, L)
    if exits_folder(run_dir) is None and (run_dir / CHECKPOINT).exists() or \
            loaded.run_dir is not None and run_dir.resolve() == loaded.run_dir.resolve():
        raise CheckpointError(f"run={job.run_name!r} is a model's own run folder: exit modules "
                              "go to a run of their own (give another run=<name>)")
    # The job as it runs (and as job.json records it): the backbone's model config, its
    # data settings (from its run's job.json) and the exits resolved.
    data = run_data_config(loaded.run_dir, job.data)
    job = dataclasses.replace(job, model=dataclasses.replace(model.config, path=job.model.path),
                              data=data, train=dataclasses.replace(tc, exit_layers=exits))
    start, state = 0, None
    if tc.resume:
        check_recipe(job, run_dir)
        modules = load_exit_modules(folder, model, ref["weights_hash"])
        state = load_train_state(folder, sharded)
        start = state["step"]
    else:
        if (run_dir / EXITS).exists() and not tc.overwrite:
            raise CheckpointError(f"run folder {run_dir} already holds exit modules: pass "
                                  "train.resume=true, train.overwrite=true or another run=<name>")
        torch.manual_seed(tc.seed)
        modules = ExitModules(model.config, exits, tc.exit_kind).init_from(model)
    model.attach_exit_modules(modules, cast=False)     # fp32 master weights under autocast
    modules.train()
    corpus = corpus_of(loaded, data)
    objective = ModulesObjective(modules, model, tc)
    if fsdp:
        shard(objective, modules.by_exit.values(), tc)
    optimizer = make_optimizer(modules, tc)     # after sharding: it steps the shards
    if state is not None:
        if sharded:
            load_shards(folder, modules, optimizer)
        else:
            optimizer.load_state_dict(state["optimizer"])
    rows = slice(rank, None, world)

    def batch(step: int):
        x, y = get_batch(corpus.tokens["train"], tc.batch_size, tc.seq_len, tc.seed, step, rows)
        return x.to(device), y.to(device)

    def states_at(step: int):     # under the training step's autocast: offline == online
        with autocast(device, tc.bf16):
            return backbone_states(model, batch(step)[0], exits)

    cache, build_s = None, 0.0
    if tc.exit_cache == "offline":
        dtype = next(model.parameters()).dtype
        # Everything the cached states depend on: the global batch and this rank's rows
        # of it, and the autocast the states were computed under.
        meta = cache_meta(ref["weights_hash"], dataclasses.asdict(data), exits,
                          tc.batch_size // world, tc.seq_len, tc.seed, tc.max_steps,
                          model.config.hidden_size, dtype)
        meta.update(global_batch_size=tc.batch_size, world=world, rank=rank,
                    bf16_autocast=tc.bf16, device=device.type)
        folder = Path(tc.exit_cache_dir) if tc.exit_cache_dir else \
            Path(job.checkpoint_root) / ".hidden-cache" / cache_key(meta)
        if world > 1:
            folder = folder / f"rank{rank}"
        t0 = time.perf_counter()
        cache, built = open_or_build(folder, meta, tc.exit_cache_dir is not None,
                                     states_at, progress and rank == 0)
        build_s = time.perf_counter() - t0 if built else 0.0

    metrics_path = run_dir / "metrics.jsonl"
    tb = None
    if rank == 0:
        make_dirs(run_dir)
        write_json_atomic(run_dir / "job.json", dataclasses.asdict(job))
        truncate_metrics(metrics_path, start)
        if tc.tensorboard:
            tb = ScalarLog(run_dir, purge_step=start + 1)
    result = TrainResult(run_dir, start)
    train_time, train_tokens, window = 0.0, 0, []
    bar = None
    if progress and rank == 0:
        bar = progress_bar(total=tc.max_steps, initial=start,
                            desc=f"exit modules {job.run_name}")
    for step in range(start, tc.max_steps):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(tc, step)
        x, y = batch(step)
        with autocast(device, tc.bf16):
            states, last = cache.read(step, device) if cache else backbone_states(model, x, exits)
            loss, kl = objective(states, last, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Each rank's loss is the mean over its rows: average the grads (fsdp's
        # reduce-scatter averages them already).
        if world > 1 and not fsdp:
            for p in modules.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(modules.parameters(), tc.grad_clip)
        optimizer.step()
        train_time += time.perf_counter() - t0
        train_tokens += x.numel() * world
        result.losses.append(loss.item())
        window.append(kl)
        result.step = step + 1
        if bar is not None:
            bar.update(1)
        if tb is not None and (step + 1) % tc.log_every == 0:
            # Rank 0's loss over the steps since the last point (no LayerDrop here).
            tb.scalars(step + 1, {"train/loss": statistics.fmean(result.losses[-tc.log_every:]),
                                  "train/lr": cosine_lr(tc, step),
                                  "train/tokens_per_s": train_tokens / train_time})
        last_step = step + 1 == tc.max_steps
        evaluating = (step + 1) % tc.eval_every == 0 or last_step
        if evaluating:
            # The step's loss and the window's KL per exit, over the global batch.
            logged = rank_mean(torch.cat([loss.detach().reshape(1),
                                          torch.stack(window).mean(0)]).double(), world)
            window = []
        saving = (step + 1) % tc.save_every == 0 or last_step
        # What rank 0 evaluates and saves: under fsdp, whole modules gathered from the shards.
        whole = modules
        if fsdp and (evaluating or saving):
            gathered = gather_state(modules)
            if rank == 0:
                whole = ExitModules(model.config, exits, tc.exit_kind)
                whole.load_state_dict(gathered)
        if evaluating and rank == 0:
            whole.eval()                # (outside the model's tree: model.eval() misses it)
            model.attach_exit_modules(whole, cast=False)
            ev = exit_perplexities(model, corpus.tokens["validation"], corpus.words["validation"],
                                   tc.seq_len, tc.batch_size, tc.eval_batches, tc.bf16)
            model.attach_exit_modules(modules, cast=False)
            modules.train()
            result.last_eval = {
                "step": step + 1, "lr": cosine_lr(tc, step), "train_loss": logged[0].item(),
                "train_kl": dict(zip(map(str, exits), logged[1:].tolist())),
                "tokens_per_s": train_tokens / train_time, "train_s": train_time,
                "cache_build_s": build_s, "exit_cache": tc.exit_cache,
                "val_loss": ev["loss"], "val_word_ppl": ev["word_ppl"],
                "val_agreement": ev["agreement"], "val_p_last_top": ev["p_last_top"]}
            append_text(metrics_path, json.dumps(result.last_eval) + "\n")
            if bar is not None:     # one line per evaluation, as the from-scratch trainer
                bar.write(f"step {step + 1}: val loss by exit "
                          + " ".join(f"{v:.2f}" for v in ev["loss"])
                          + " | KL by module " + " ".join(f"{v:.3f}" for v in logged[1:].tolist()))
            if tb is not None:      # with the window's KL per exit, as metrics.jsonl has it
                tb.scalars(step + 1, {**eval_scalars(result.last_eval),
                                      **{f"train/kl/exit_{e}": v
                                         for e, v in result.last_eval["train_kl"].items()}})
                tb.flush()          # an evaluation shows in TensorBoard at once
        if saving and tb is not None:   # what the checkpoint covers is on disk before it
            tb.flush()
        if saving and fsdp:
            save_sharded(lambda also: save_exit_modules(run_dir, whole, ref, {"step": step + 1},
                                                        also), modules, optimizer)
        elif saving and rank == 0:
            save_exit_modules(run_dir, modules, ref, {"step": step + 1,
                                                      "optimizer": optimizer.state_dict()})
        if world > 1 and evaluating:
            dist.barrier()
    if bar is not None:
        bar.close()
    if tb is not None:
        tb.close()
    return result
