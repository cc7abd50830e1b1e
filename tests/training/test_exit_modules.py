"""Exit modules on a frozen backbone (Balcony): the modules, their training online and
offline, their file, and every decoder reading exits through them."""

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tinyskip.cli import compose_job
from tinyskip.config import ConfigError, DEEConfig, SSDConfig, UserError
from tinyskip.decode import ModeSpec, decode, dee_generate, generate, ssd_generate
from tinyskip.model.exit_modules import ExitModules
from tinyskip.model.kv_cache import KVCache
from tinyskip.storage.loading import load_source
from tinyskip.training.exit_training import backbone_states, exit_module_loss, train_exit_modules
from tinyskip.training.optim import cosine_lr

KINDS = ["block", "mlp", "attention", "norm"]


@pytest.fixture
def model_with_modules(tiny_model, request):
    torch.manual_seed(1)
    modules = ExitModules(tiny_model.config, [1, 2], request.param)
    for p in modules.parameters():          # away from the init, so the test means something
        p.data.add_(torch.randn_like(p) * 0.05)
    tiny_model.attach_exit_modules(modules)
    return tiny_model


def test_a_block_module_initialised_from_the_last_block_reproduces_it(tiny_model):
    modules = ExitModules(tiny_model.config, [2], "block").init_from(tiny_model)
    h = torch.randn(2, 7, tiny_model.config.hidden_size)
    ctx = tiny_model.context(0, 7)
    torch.testing.assert_close(modules[2].body(h, ctx), tiny_model.layers[-1](h, ctx))
    torch.testing.assert_close(modules[2](h, ctx), tiny_model.norm(tiny_model.layers[-1](h, ctx)))


@pytest.mark.parametrize("model_with_modules", KINDS, indirect=True)
def test_cached_exit_logits_equal_the_uncached_forward(model_with_modules):
    """Token by token through the cache (module keys written as block 1 runs) = one
    causal pass over the whole sequence."""
    model = model_with_modules
    ids = torch.randint(0, 97, (1, 10))
    ref = model(ids, exits=[1, 2])                # exits 1, 2 through their modules
    cache = KVCache(model.config, 1, 16, extra_layers=model.exit_modules.cache_slots)
    for p in range(10):
        h1 = model.run_layers(model.embed(ids[:, p:p + 1]), 0, 1, cache, p)
        h2 = model.run_layers(h1, 1, 2, cache, p)
        for e, h in ((1, h1), (2, h2)):
            torch.testing.assert_close(model.head_at(h, e, cache, p)[0, 0], ref[e - 1, 0, p],
                                       atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_with_modules", ["block", "mlp"], indirect=True)
def test_greedy_ssd_with_an_exit_module_draft_equals_full_decoding(model_with_modules):
    model = model_with_modules
    prompt = torch.randint(0, 97, (1, 6))
    full = generate(model, prompt, 24).tokens[0]
    for E in (1, 2):
        for k in (1, 3):
            g = ssd_generate(model, prompt, 24, SSDConfig(E, k))
            assert g.tokens[0] == full, (E, k)
    # The draft really goes through the module: the draft step's logits are the module's.
    from tinyskip.decode.steps import Steps, positions
    from tinyskip.model.exits import ExitHead
    cache = KVCache(model.config, 1, 16, extra_layers=model.exit_modules.cache_slots)
    model.run_layers(model.embed(prompt), 0, 2, cache, 0)
    h, logits, _ = Steps(model).token(prompt[:, -1:], 2, cache, positions(6, 1, "cpu"), ExitHead(model))
    torch.testing.assert_close(logits, model.head_at(h, 2, cache, 6))
    assert not torch.allclose(logits, model.head(h))


@pytest.mark.parametrize("model_with_modules", ["block", "attention"], indirect=True)
def test_decoders_write_only_the_module_keys_they_read(model_with_modules, monkeypatch):
    """Full decoding reads no module, static exit only its own (whose forward writes its
    keys) and SSD only its draft exit's: none pays for other modules' keys, and their
    tokens are those of a pass that does."""
    from tinyskip.model.exit_modules import ExitModule

    model = model_with_modules
    prompt = torch.randint(0, 97, (1, 6))
    written = []
    real = ExitModule.write_kv
    monkeypatch.setattr(ExitModule, "write_kv",
                        lambda self, h, ctx: written.append(h.shape[1]) or real(self, h, ctx))
    full = generate(model, prompt, 12).tokens[0]
    static = generate(model, prompt, 12, exit_layer=2).tokens[0]
    assert written == []
    ids = torch.tensor([prompt[0].tolist() + full[:-1]])
    assert full == model(ids, exits=[4])[0, 0, 5:].argmax(-1).tolist()
    ids = torch.tensor([prompt[0].tolist() + static[:-1]])
    assert static == model(ids, exits=[2])[0, 0, 5:].argmax(-1).tolist()
    # SSD reads only its draft exit's module: its keys are written at every position the
    # output passed (by the draft steps' own module calls, and by the blocks-only calls
    # where a position ran no module: the prompt, a round's last draft), a deeper
    # module's never. Its tokens still equal full decoding's.
    # Blocks 1.. and module 1 add nothing to the residual, so module 1 predicts what the
    # last exit does: every draft is accepted and every round ends with a blocks-only call.
    with torch.no_grad():
        for block in [*model.layers[1:], model.exit_modules[1]]:
            block.self_attn.o_proj.weight.zero_()
            if hasattr(block, "mlp"):
                block.mlp.down_proj.weight.zero_()
        model.exit_modules[1].norm.weight.copy_(model.norm.weight)
    slots = {e: model.exit_modules[e].self_attn.layer_idx for e in (1, 2)}
    filled = {slot: set() for slot in slots.values()}
    update = KVCache.update
    monkeypatch.setattr(KVCache, "update", lambda self, layer, pos, k, v: filled.get(
        layer, set()).update(pos.tolist()) or update(self, layer, pos, k, v))
    written.clear()
    g = ssd_generate(model, prompt, 24, SSDConfig(1, 3))
    assert g.tokens[0] == generate(model, prompt, 24).tokens[0]
    assert g.stats.accepted == g.stats.drafted > 0
    assert filled[slots[1]] >= set(range(6 + 24 - 1)) and filled[slots[2]] == set()
    # Keys written apart from a module's own call: the prompt's, and at most one position
    # per round (its last draft); the draft steps' module calls write the rest themselves.
    assert 6 < sum(written) <= 6 + g.stats.rounds


@pytest.mark.parametrize("model_with_modules", ["block", "attention"], indirect=True)
def test_lookup_rounds_write_the_draft_modules_keys_at_their_positions(model_with_modules,
                                                                      monkeypatch):
    """A round of found drafts runs blocks only (no module call) over its positions: the
    blocks-only call must write the draft exit's module keys there, or later exit drafts
    attend to stale ones."""
    model = model_with_modules
    prompt = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])     # repeats: rounds find drafts
    slot = model.exit_modules[1].self_attn.layer_idx
    filled = set()
    update = KVCache.update
    monkeypatch.setattr(KVCache, "update", lambda self, layer, pos, k, v: (
        filled.update(pos.tolist()) if layer == slot else None) or update(self, layer, pos, k, v))
    g = ssd_generate(model, prompt, 16, SSDConfig(1, 3, ngram=2))
    assert g.tokens[0] == generate(model, prompt, 16).tokens[0]
    assert g.stats.lookup_rounds > 0
    assert filled >= set(range(10 + 16 - 1))


@pytest.mark.parametrize("model_with_modules", ["block", "attention"], indirect=True)
def test_ssd_drafts_the_same_as_when_every_module_key_is_written(model_with_modules,
                                                                 monkeypatch):
    """The keys SSD leaves unwritten are never read: with every module's keys written
    on every call, each draft, acceptance and token is the same (greedy and sampled;
    adaptive drafting; a small draft vocabulary; drafts rejected and accepted)."""
    from tinyskip.decode import SamplingConfig
    from tinyskip.model.transformer import Transformer

    model = model_with_modules
    prompt = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(0))
    # Blocks 1.. add nothing, module 1 adds a little to what the last exit reads, and
    # a scaled head sharpens both: drafts are sometimes accepted, sometimes not.
    with torch.no_grad():
        for block in [*model.layers[1:], model.exit_modules[1]]:
            scale = 0.0 if block in model.layers else 0.5
            block.self_attn.o_proj.weight.mul_(scale)
            if hasattr(block, "mlp"):
                block.mlp.down_proj.weight.mul_(scale)
        model.exit_modules[1].norm.weight.copy_(model.norm.weight)
        model.lm_head.weight.mul_(8)
    cases = [(SSDConfig(1, 3), SamplingConfig(), None),
             (SSDConfig(1, 3, adaptive_threshold=0.06), SamplingConfig(), None),
             (SSDConfig(1, 3), SamplingConfig(temperature=1.0), None),
             (SSDConfig(1, 3), SamplingConfig(temperature=0.8), torch.arange(0, 97, 2)),
             # Lookup rounds (blocks over several positions at once).
             (SSDConfig(1, 3, ngram=1), SamplingConfig(), None)]

    def run_all():
        return [ssd_generate(model, prompt, 20, cfg, sampling,
                             generator=torch.Generator().manual_seed(5), draft_ids=ids)
                for cfg, sampling, ids in cases]

    lean = run_all()
    real = Transformer.run_layers
    monkeypatch.setattr(Transformer, "run_layers", lambda self, h, start, end, cache=None,
                        pos=0, exit_kv=None: real(self, h, start, end, cache, pos, None))
    for a, b in zip(lean, run_all()):
        assert a.tokens == b.tokens
        assert (a.stats.drafted, a.stats.accept_hist) == (b.stats.drafted, b.stats.accept_hist)
    assert 0 < lean[0].stats.accepted < lean[0].stats.drafted
    assert lean[-1].stats.lookup_rounds > 0


@pytest.mark.parametrize("model_with_modules", ["mlp"], indirect=True)
def test_module_calls_are_counted_and_priced(model_with_modules):
    """A head call through an exit module is also a module call, which the benchmark
    prices at the module's own measured cost (not as a bare head)."""
    from tinyskip.analysis.unit_costs import unit_costs

    model, prompt = model_with_modules, torch.randint(0, 97, (1, 6))
    assert not any(k.startswith("module:") for k in generate(model, prompt, 8).stats.calls)
    static = generate(model, prompt, 8, exit_layer=2).stats.calls
    assert static["module:1"] == static["head:1"] == 8
    ssd = ssd_generate(model, prompt, 8, SSDConfig(1, 2)).stats
    # Every draft step reads module 1; the prefill's first token and the verifies do not.
    assert ssd.calls["module:1"] == ssd.drafted > 0
    dee = dee_generate(model, prompt, 8, DEEConfig("softmax", [0.0], [2])).stats.calls
    assert dee["module:1"] == 7             # every token but prefill's leaves at exit 2
    # A head-free measure (saturation: none at the first check, >= -1 at the second)
    # reads the module once, for the token that leaves at exit 2.
    dee = dee_generate(model, prompt, 8, DEEConfig("saturation", [-1.0], [1, 2])).stats.calls
    assert dee["module:1"] == 7
    costs = unit_costs(model, 8, 2, reps=3)
    assert costs["module:1"] > 0 and costs["module:2"] > 0


@pytest.mark.parametrize("model_with_modules", ["block", "attention"], indirect=True)
@pytest.mark.parametrize("cache", ["propagate", "recompute", "copy"])
def test_dee_reads_confidence_from_the_modules_and_equals_full_at_infinity(model_with_modules,
                                                                           cache):
    model = model_with_modules
    prompt = torch.randint(0, 97, (1, 6))
    full = generate(model, prompt, 16).tokens[0]
    never = dee_generate(model, prompt, 16, DEEConfig("softmax", [float("inf")], [1, 2], cache=cache))
    assert never.tokens[0] == full
    # Every token after the first (prefill's, from the full model) leaves at exit 2: the
    # module's static exit continued from that first token, whatever fills deeper layers.
    always = dee_generate(model, prompt, 16, DEEConfig("softmax", [0.0], [2], cache=cache)).tokens[0]
    first = torch.tensor([[always[0]]])
    assert always[1:] == generate(model, torch.cat([prompt, first], 1), 15, exit_layer=2).tokens[0]


def _folder_digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def balcony(tiny_train_overrides, trained_tiny, wikitext_path, data_cache, tmp_path_factory):
    """Block exit modules (default exits) trained for a few steps on the tiny layerskip
    run, online and offline: (root, job args, online result, offline result, backbone
    folder digest before training)."""
    root = tmp_path_factory.mktemp("balcony")
    shutil.copytree(trained_tiny[2], root / "tiny")
    before = _folder_digest(root / "tiny")
    overrides = tiny_train_overrides(wikitext_path, data_cache, root, "x", max_steps=6,
                                     eval_every=6, save_every=3, lr=1e-3, bf16=False)
    args = [o for o in overrides if not o.startswith(("model", "run="))] + [
        "train=balcony", "train.backbone=tiny", "train.max_steps=6", "train.eval_every=6",
        "train.save_every=3", "train.device=cpu"]   # (a two-rank run here is on gloo)
    online = train_exit_modules(compose_job("train", args + ["run=tiny-exits"]), progress=False)
    offline = train_exit_modules(compose_job("train", args + ["run=tiny-exits-offline",
                                                 "train.exit_cache=offline"]), progress=False)
    return root, args, online, offline, before


def test_training_leaves_the_backbone_untouched_and_writes_only_modules(balcony):
    root, _, online, _, before = balcony
    assert online.step == 6
    assert _folder_digest(root / "tiny") == before        # weights, job.json, metrics: all
    exits = root / "tiny-exits" / "exits"
    meta = json.loads((exits / "exit_modules.json").read_text())
    assert meta["kind"] == "block" and meta["exit_layers"] == [1, 2, 3]     # L/4, L/2, 3L/4
    assert meta["backbone"]["format"] == "tinyskip" and len(meta["backbone"]["weights_hash"]) == 64
    assert sorted(p.name for p in exits.iterdir()) == ["exit_modules.json",
                                                       "exit_modules.safetensors", "train_state.pt"]
    assert not (root / "tiny-exits" / "tensorboard").exists()     # train.tensorboard is off


def test_tensorboard_scalars_are_what_metrics_jsonl_holds_and_a_fresh_run_replaces_them(
        balcony, tensorboard_scalars, val_tags):
    root, args, _, _, _ = balcony
    tb_args = args + ["run=tiny-exits-tb", "train.tensorboard=true", "train.log_every=2",
                      "train.eval_every=3"]
    train_exit_modules(compose_job("train", tb_args), progress=False)
    # The same run started over (another lr): TensorBoard shows only the new run's points.
    # (It reads a folder's event files in name order, which counts whole seconds.)
    time.sleep(1.1)
    job = compose_job("train", tb_args + ["train.overwrite=true", "train.lr=3e-3"])
    result = train_exit_modules(job, progress=False)
    run = root / "tiny-exits-tb"
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6]
    tags = tensorboard_scalars(run / "tensorboard")
    val = val_tags(rows)
    kl = {f"train/kl/exit_{e}": [(r["step"], pytest.approx(r["train_kl"][str(e)], rel=1e-6))
                                 for r in rows] for e in (1, 2, 3)}
    assert set(tags) == set(val) | set(kl) | {"train/loss", "train/lr", "train/tokens_per_s"}
    assert {tag: tags[tag] for tag in val} == val
    assert {tag: tags[tag] for tag in kl} == kl
    logged = [2, 4, 6]
    assert tags["train/loss"] == [(s, pytest.approx(statistics.fmean(result.losses[s - 2:s]),
                                                    rel=1e-6)) for s in logged]
    assert tags["train/lr"] == [(s, pytest.approx(cosine_lr(job.train, s - 1), rel=1e-6))
                                for s in logged]


@pytest.mark.parametrize("kind", KINDS)
def test_optimiser_steps_change_the_modules_and_leave_the_backbone_bit_identical(trained_tiny, kind):
    """In memory, as the trainer steps: the modules copy (never alias) the last block and
    the final norm, and only their parameters reach the optimiser."""
    from tinyskip.storage.data import get_batch
    from tinyskip.training.trainer import make_optimizer

    model, corpus, _ = trained_tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tc = compose_job("train", ["train=balcony", "train.ce_weight=0.5"]).train
    model.requires_grad_(False)
    modules = ExitModules(model.config, [1, 3], kind).init_from(model)
    module_before = {k: v.clone() for k, v in modules.state_dict().items()}
    model.attach_exit_modules(modules, cast=False)
    try:
        optimizer = make_optimizer(modules, tc)
        for step in range(3):
            x, y = get_batch(corpus.tokens["train"], 4, 16, 0, step)
            loss = exit_module_loss(model, *backbone_states(model, x, [1, 3]), y, [1, 3], tc)[0]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        model.attach_exit_modules(None)
        model.requires_grad_(True)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(not torch.equal(v, module_before[k]) for k, v in modules.state_dict().items())


def test_offline_training_reproduces_online_training_loss_for_loss(balcony):
    root, _, online, offline, _ = balcony
    assert offline.losses == online.losses
    [cache] = list((root / ".hidden-cache").iterdir())
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["steps"] == 6 and meta["exit_layers"] == [1, 2, 3] and not meta["bf16_autocast"]
    assert offline.last_eval["cache_build_s"] > 0 and online.last_eval["exit_cache"] == "online"


@pytest.mark.slow
@pytest.mark.parametrize("mode,parallel", [("online", "ddp"), ("offline", "ddp"),
                                           ("online", "fsdp")])
def test_two_data_parallel_processes_train_the_modules_as_one_does(repo, balcony, mode,
                                                                   parallel):
    """torchrun with two ranks, each on half of every batch (offline: each from its own
    rank's cache; fsdp: each holding half of the modules and their optimizer state),
    logs the same global loss, KL and validation loss as one process."""
    root, args, _, _, _ = balcony
    run = f"tiny-exits-{parallel}-{mode}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tinyskip.train", *args, f"run={run}", f"train.exit_cache={mode}",
           f"train.parallel={parallel}"]
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    [ddp] = [json.loads(l) for l in (root / run / "metrics.jsonl").read_text().splitlines()]
    [one] = [json.loads(l) for l in (root / "tiny-exits" / "metrics.jsonl").read_text().splitlines()]
    assert ddp["step"] == one["step"] == 6
    # (abs: the loss is a KL of about 2e-5, whose last float32 digits move with the order
    # of fsdp's sums)
    assert ddp["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4, abs=1e-8)
    # (abs: a module initialised from the last block starts at a KL of about 1e-7)
    assert ddp["train_kl"] == pytest.approx(one["train_kl"], rel=1e-4, abs=1e-6)
    assert ddp["val_loss"] == pytest.approx(one["val_loss"], rel=1e-4)
    if parallel == "fsdp":      # whole modules for decoders, the shards for a resume
        exits = root / run / "exits"
        assert json.loads((exits / "sharded.json").read_text())["world_size"] == 2
        loaded = load_source(run, None, str(root), None, torch.device("cpu"))
        assert loaded.model.exit_modules.exit_layers == [1, 2, 3]
        # Killed after its step-3 save, the two-rank run's shards resume on one process
        # (whole modules and optimizer) to the numbers the uninterrupted run logged.
        killed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc_per_node=2", "tests/training/killed_run.py", "3",
                                 *args, "run=killed", f"train.exit_cache={mode}",
                                 f"train.parallel={parallel}"],
                                cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert killed.returncode != 0 and (root / "killed" / "exits" / "sharded.json").is_file()
        again = train_exit_modules(compose_job("train", args + ["run=killed",
                                                                "train.resume=true"]),
                                   progress=False)
        assert again.step == 6 and len(again.losses) == 3
        [resumed] = [json.loads(l) for l in (root / "killed" / "metrics.jsonl").read_text()
                     .splitlines()]
        assert resumed["train_loss"] == pytest.approx(ddp["train_loss"], rel=1e-4, abs=1e-8)
        assert resumed["val_loss"] == pytest.approx(ddp["val_loss"], rel=1e-5)


def test_a_finished_run_resumes_with_its_default_exits(balcony):
    root, args, _, _, _ = balcony
    again = train_exit_modules(compose_job("train", args + ["run=tiny-exits", "train.resume=true"]),
                  progress=False)
    assert again.step == 6 and again.losses == []


def test_the_backbones_own_run_folder_is_refused(balcony):
    root, args, _, _, before = balcony
    with pytest.raises(UserError, match="is a model's own run folder"):
        train_exit_modules(compose_job("train", args + ["run=tiny"]), progress=False)
    assert _folder_digest(root / "tiny") == before


def test_evaluate_and_bench_read_the_exits_through_the_modules(balcony):
    from tinyskip.analysis.bench import benchmark
    from tinyskip.analysis.evaluation import evaluate

    root = balcony[0]
    base = ["split=validation", "max_batches=2"]
    bare = evaluate(compose_job("evaluate", [f"checkpoint={root / 'tiny'}"] + base))
    mods = evaluate(compose_job("evaluate", [f"checkpoint={root / 'tiny-exits'}"] + base))
    assert all(a != b for a, b in zip(bare["loss"][:3], mods["loss"][:3]))
    assert bare["loss"][3] == mods["loss"][3]               # exit L has no module
    assert mods["checkpoint"].endswith("exits")
    res = benchmark(compose_job("bench", [f"checkpoint={root / 'tiny-exits'}", "n_prompts=1",
                                          "prompt_len=8", "max_new_tokens=6", "draft_layer=[2]",
                                          "k=[2]", "exit_layer=[2]", "out_dir=null"]))
    assert [r["mode"] for r in res["rows"]] == ["full", "static E=2", "ssd E=2 k=2"]
    assert res["rows"][2]["agreement"] == 1.0


def test_decoders_load_the_modules_with_their_backbone_and_refuse_another(balcony, tmp_path):
    root = balcony[0]
    loaded = load_source("tiny-exits", None, str(root), None, torch.device("cpu"))
    assert loaded.model.exit_modules is not None and loaded.run_dir == root / "tiny-exits"
    prompt = torch.tensor([loaded.tokenizer.encode("the game was played")])
    full = decode(loaded.model, prompt, 12, ModeSpec("full")).tokens[0]
    assert decode(loaded.model, prompt, 12, ModeSpec("ssd", ssd=SSDConfig(2, 3))).tokens[0] == full
    # Another backbone under the recorded path: refused with one line.
    shutil.copytree(root / "tiny", tmp_path / "tiny")
    shutil.copytree(root / "tiny-exits", tmp_path / "tiny-exits")
    other = load_source("tiny", None, str(tmp_path), None, torch.device("cpu")).model
    other.norm.weight.data += 1
    from tinyskip.storage.checkpoint import save_checkpoint
    save_checkpoint(tmp_path / "tiny", other, root / "tiny" / "checkpoint" / "tokenizer.model")
    meta_path = tmp_path / "tiny-exits" / "exits" / "exit_modules.json"
    meta = json.loads(meta_path.read_text())
    meta["backbone"]["path"] = str(tmp_path / "tiny" / "checkpoint")
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="trained on a backbone with weight hash"):
        load_source("tiny-exits", None, str(tmp_path), None, torch.device("cpu"))


def test_offline_and_online_training_give_the_same_loss_on_the_same_batch(trained_tiny):
    from tinyskip.storage.data import get_batch
    from tinyskip.training.hidden_cache import cache_meta, open_or_build

    model, corpus, _ = trained_tiny
    tc = compose_job("train", ["train=balcony"]).train
    modules = ExitModules(model.config, [1, 3], "block").init_from(model)
    model.attach_exit_modules(modules)
    try:
        x, y = get_batch(corpus.tokens["train"], 4, 16, 0, 5)
        online = exit_module_loss(model, *backbone_states(model, x, [1, 3]), y, [1, 3], tc)[0]
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            meta = cache_meta("h", {}, [1, 3], 4, 16, 0, 6, model.config.hidden_size, torch.float32)
            cache, built = open_or_build(Path(tmp) / "c", meta, False,
                                         lambda s: backbone_states(model, get_batch(
                                             corpus.tokens["train"], 4, 16, 0, s)[0], [1, 3]),
                                         progress=False)
            assert built
            offline = exit_module_loss(model, *cache.read(5, "cpu"), y, [1, 3], tc)[0]
            assert offline.item() == online.item()
            assert not open_or_build(Path(tmp) / "c", meta, False, None, progress=False)[1]
            other = dict(meta, backbone_hash="other")
            with pytest.raises(UserError, match="made for another backbone"):
                open_or_build(Path(tmp) / "c", other, True, None, progress=False)
            with pytest.raises(UserError, match=r"made for other data or settings \(data differ\)"):
                open_or_build(Path(tmp) / "c", dict(meta, data={"path": "x"}), True, None,
                              progress=False)
    finally:
        model.attach_exit_modules(None)


@pytest.mark.parametrize("layers,message", [
    ([0], "0 is outside 1..3"), ([4], "4 is outside 1..3"), ([2, 2], "listed twice"),
])
def test_bad_exit_layers_are_refused(tiny_config, layers, message):
    with pytest.raises(ConfigError, match=message):
        ExitModules(tiny_config(), layers, "block")


def test_zero_kl_and_ce_weights_are_refused():
    with pytest.raises(UserError, match="the exit modules would learn nothing"):
        compose_job("train", ["train=balcony", "train.kl_weight=0"])


def test_exit_modules_train_on_a_hugging_face_llama_through_the_shim(trained_tiny, wikitext_path,
                                                                     data_cache, tmp_path):
    """A tiny random Llama in Hugging Face's layout (written by the export), trained
    through ``model=hf_llama``: the modules record the folder and its weight hash."""
    from tinyskip.storage.hf_llama import export_hf

    torch.manual_seed(3)
    model = type(trained_tiny[0])(trained_tiny[0].config)          # random weights
    hf = export_hf(model, trained_tiny[2] / "checkpoint" / "tokenizer.model", tmp_path / "hf")
    (hf / "tokenizer.model").unlink()       # tokenizer.json alone, as most Hub models ship
    data = [f"data.path={wikitext_path}", f"data.cache_dir={data_cache}", "data.max_rows=1000",
            "data.vocab_size=300"]
    job = compose_job("train", data + [
        "train=balcony", "model=hf_llama", f"model.path={hf}", f"checkpoint_root={tmp_path}",
        "run=hf-exits", "train.exit_kind=mlp", "train.max_steps=2", "train.eval_every=2",
        "train.eval_batches=1", "train.batch_size=4", "train.seq_len=32", "train.bf16=false"])
    assert train_exit_modules(job, progress=False).step == 2
    meta = json.loads((tmp_path / "hf-exits" / "exits" / "exit_modules.json").read_text())
    assert meta["backbone"]["format"] == "hf" and meta["backbone"]["path"] == str(hf.resolve())
    loaded = load_source("hf-exits", None, str(tmp_path), None, torch.device("cpu"))
    assert loaded.model.exit_modules.kind == "mlp" and loaded.model.exit_modules.exit_layers == [1, 2, 3]
    # It trained on the corpus as the model reads it: each split through its tokenizer.
    from tinyskip.storage.data import load_lines
    from tinyskip.storage.loading import corpus_of

    streams = corpus_of(loaded, job.data)
    lines = load_lines(job.data)[0]["train"]
    assert streams.tokens["train"].tolist() == loaded.tokenizer.encode(
        " ".join(line.strip() for line in lines if line.strip()))
    assert streams.stop == loaded.tokenizer.stop_ids()
    assert streams.words["train"] == sum(len(line.split()) for line in lines)
