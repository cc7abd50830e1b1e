"""The training step: dropout, the fused and sampled exit loss, compiled blocks, FLOPs."""


import pytest
import torch
import torch.nn.functional as F

from tinyskip.config import ConfigError, ModelConfig, TrainConfig
from tinyskip.model.kernels import causal_attention
from tinyskip.model.transformer import Transformer
from tinyskip.training.bench import step_flops, step_products
from tinyskip.training.losses import early_exit_loss, sampled_exit_loss
from tinyskip.training.trainer import ExitObjective, compile_blocks, make_optimizer, train_step


@pytest.fixture
def dropout_model(tiny_config):
    def make(**rates) -> Transformer:
        torch.manual_seed(0)
        return Transformer(tiny_config(**rates))
    return make


def test_dropout_is_off_in_eval_and_on_in_training(dropout_model):
    rates = dict(attention_dropout=0.2, hidden_dropout=0.2, embedding_dropout=0.2)
    model, plain = dropout_model(**rates), dropout_model()
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        model.eval(), plain.eval()
        assert torch.equal(model(ids), plain(ids))           # eval: as if no dropout
        model.train()
        assert not torch.allclose(model(ids), plain(ids))     # training: masks applied
        plain.train()
        assert torch.equal(plain(ids), plain(ids))            # rates 0: nothing random


@pytest.mark.parametrize("name", ["attention_dropout", "hidden_dropout", "embedding_dropout"])
def test_each_dropout_acts_in_training(dropout_model, name):
    model, plain = dropout_model(**{name: 0.5}), dropout_model()
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        assert not torch.allclose(model.train()(ids), plain.train()(ids))


def _step_losses(dropout_model, tc, steps, seed_before):
    model = dropout_model(attention_dropout=0.1, hidden_dropout=0.1, embedding_dropout=0.1)
    opt = make_optimizer(model.train(), tc)
    x, y = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(1)), \
        torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(seed_before)             # the step reseeds: prior RNG use is irrelevant
    objective = ExitObjective(model, tc)
    losses = [train_step(objective, opt, tc, x, y, s).loss.item() for s in steps]
    return losses, model.layers[0].mlp.up_proj.weight.detach().clone()


def test_a_seeded_training_step_is_deterministic_under_dropout(dropout_model):
    tc = TrainConfig(preset="layerskip", exit_weighting="layerskip", e_scale=0.2,
                     layerdrop_p_max=0.2, exit_token_fraction=0.5, bf16=False, batch_size=4)
    (a, wa), (b, wb) = (_step_losses(dropout_model, tc, (7, 8), 123),
                        _step_losses(dropout_model, tc, (7, 8), 456))
    assert a == b and torch.equal(wa, wb)


def test_each_step_draws_its_own_dropout_masks(dropout_model):
    # No LayerDrop, one exit, every token: steps 7 and 9 differ only in their masks.
    tc = TrainConfig(bf16=False, batch_size=4, lr=1e-9, warmup_steps=0)
    (first,), _ = _step_losses(dropout_model, tc, (7,), 0)
    (again,), _ = _step_losses(dropout_model, tc, (7,), 0)
    (other,), _ = _step_losses(dropout_model, tc, (9,), 0)
    assert first == again and other != first


def test_layerdrop_runs_each_row_through_exactly_its_kept_blocks_unscaled(tiny_model):
    """LayerDrop by hand: row b runs block l (plain, as in eval) unless
    drop_draws[b, l] < p_l, and a dropped block is the identity; nothing is rescaled by
    1/(1-p). The draws cover a block some rows drop, a block every row keeps although
    p > 0, a block every row drops, and a draw equal to p (kept: only u < p drops)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 97, (4, 10))
    p = [0.5, 0.25, 0.75, 0.5]
    draws = torch.tensor([[0.1, 0.9, 0.2, 0.5],     # row 0 drops blocks 0 and 2
                          [0.6, 0.3, 0.0, 0.4],     # row 1 drops blocks 2 and 3
                          [0.5, 0.8, 0.7, 0.9],     # row 2 keeps block 0 (u == p), drops 2
                          [0.2, 0.25, 0.1, 0.05]])  # row 3 drops blocks 0, 2 and 3
    keeps = draws >= torch.tensor(p)
    assert keeps[:, 1].all() and not keeps[:, 2].any() and 0 < int(keeps[:, 0].sum()) < 4
    tiny_model.train()                              # tiny_config: every dropout rate 0
    with torch.no_grad():
        # Default exit (the last one) and head=False: the final norm's input states, (1, B, T, d).
        got = tiny_model(ids, layer_drop=p, drop_draws=draws, head=False)
        want = []
        for b in range(ids.shape[0]):
            h = tiny_model.embed(ids[b:b + 1])
            for layer in range(tiny_model.num_layers):
                if keeps[b, layer]:
                    h = tiny_model.run_layers(h, layer, layer + 1)
            want.append(tiny_model.norm(h))
    assert got.shape == (1, 4, 10, tiny_model.config.hidden_size)
    torch.testing.assert_close(got[0], torch.cat(want), atol=1e-5, rtol=1e-5)


def test_dropout_rates_outside_zero_one_are_refused(tiny_config):
    with pytest.raises(ConfigError, match=r"ModelConfig.hidden_dropout=1.0: must be in \[0, 1\)"):
        tiny_config(hidden_dropout=1.0)


def test_sampled_exit_loss_with_every_token_equals_the_logits_loss(tiny_model):
    ids, y = torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 9))
    w = torch.tensor([0.2, 0.3, 0.5])
    states = tiny_model(ids, exits=[1, 3, 4], head=False)           # (3, 2, 9, d)
    total, per_exit, scored = sampled_exit_loss(states, tiny_model.lm_head.weight, y, w)
    assert scored == 3 * 18
    ref_total, ref_per_exit = early_exit_loss(tiny_model(ids, exits=[1, 3, 4]), y, w)
    torch.testing.assert_close(per_exit, ref_per_exit)
    torch.testing.assert_close(total, ref_total)


def test_sampled_exit_loss_scores_a_subset_at_earlier_exits_and_all_at_the_last(tiny_model):
    ids, y = torch.randint(0, 97, (2, 10)), torch.randint(0, 97, (2, 10))
    states = tiny_model(ids, exits=[1, 2, 4], head=False)
    w = torch.tensor([0.1, 0.3, 0.6])
    total, per_exit, scored = sampled_exit_loss(states, tiny_model.lm_head.weight, y, w, 0.25,
                                                torch.Generator().manual_seed(5))
    assert scored == 5 + 5 + 20
    # One draw of 0.25 of the 20 positions, shared by both earlier exits.
    idx = torch.randperm(20, generator=torch.Generator().manual_seed(5))[:5]
    logits = tiny_model.lm_head(states).reshape(3, 20, -1)
    expected = [F.cross_entropy(logits[0, idx], y.reshape(-1)[idx]),
                F.cross_entropy(logits[1, idx], y.reshape(-1)[idx]),
                F.cross_entropy(logits[2], y.reshape(-1))]
    torch.testing.assert_close(per_exit, torch.stack(expected))
    torch.testing.assert_close(total, (per_exit * w).sum())


def test_exit_token_fraction_outside_zero_one_is_refused():
    with pytest.raises(ConfigError, match="exit_token_fraction=0.0: must be in"):
        TrainConfig(exit_token_fraction=0.0)


@pytest.mark.parametrize("gqa", [False, True])
def test_bf16_causal_attention_equals_sdpa_in_value_and_gradient(gqa, monkeypatch):
    calls = []
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or real_sdpa(*a, **k))
    torch.manual_seed(0)
    n_kv = 2 if gqa else 4
    q0, k0, v0 = torch.randn(2, 4, 16, 8), torch.randn(2, n_kv, 16, 8), torch.randn(2, n_kv, 16, 8)
    g = torch.randn(2, 4, 16, 8)
    grads = []
    for bf16 in (True, False):
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        out = causal_attention(*(t.bfloat16() for t in (q, k, v))) if bf16 else \
            real_sdpa(q, k, v, is_causal=True, enable_gqa=gqa)
        out.float().backward(g)
        grads.append([out.detach().float(), q.grad, k.grad, v.grad])
    assert not calls                                   # bf16 on the CPU: the explicit path
    for got, ref in zip(*grads):
        torch.testing.assert_close(got, ref, atol=5e-2, rtol=5e-2)


def test_attention_dropout_drops_attention_probabilities():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 4).bfloat16() for _ in range(3))
    torch.manual_seed(1)
    dropped = causal_attention(q, k, v, dropout=0.5)
    assert not torch.equal(dropped, causal_attention(q, k, v))
    # Position 0 attends to itself alone: dropped it is 0, kept it is v / (1 - p).
    first = dropped[0, :, 0]
    assert all(torch.equal(r, torch.zeros_like(r)) or torch.allclose(r.float(), 2 * v[0, h, 0].float())
               for h, r in enumerate(first))


def test_compiled_blocks_do_not_recompile_for_new_exit_sets_or_drop_rates(dropout_model):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = dropout_model()
    tc = TrainConfig(preset="layerskip", exit_weighting="layerskip", e_scale=0.2, curriculum="gradual",
                     layerdrop_p_max=0.5, layerdrop_time="exp", max_steps=8, bf16=False,
                     batch_size=4)
    assert compile_blocks(model)
    counters.clear()                       # not the compiler probe's own graph
    opt, objective = make_optimizer(model.train(), tc), ExitObjective(model, tc)
    x, y = torch.randint(0, 97, (4, 16)), torch.randint(0, 97, (4, 16))
    for step in range(8):                  # exit sets grow, drop rates rise, rows vary
        train_step(objective, opt, tc, x, y, step)
    # Two graphs for the block (a static first call, then one dynamic in the rows) and
    # one for the final norm (dynamic in the exits from its first call), whatever the
    # exit set: compiling the whole forward instead makes one per exit set.
    assert counters["stats"]["unique_graphs"] <= 3
    assert model.norm._compiled_call_impl is not None
    assert list(model.state_dict()) == list(dropout_model().state_dict())


def test_blocks_train_eagerly_after_one_warning_where_the_compiler_is_missing(dropout_model, no_cxx):
    model = dropout_model()
    with pytest.warns(UserWarning, match="torch.compile is unavailable here"):
        assert not compile_blocks(model)
    torch._dynamo.reset()
    tc = TrainConfig(max_steps=2, bf16=False, batch_size=4)
    opt, objective = make_optimizer(model.train(), tc), ExitObjective(model, tc)
    x, y = torch.randint(0, 97, (4, 16)), torch.randint(0, 97, (4, 16))
    assert torch.isfinite(train_step(objective, opt, tc, x, y, 0).loss)
    assert all(layer._compiled_call_impl is None for layer in model.layers)


def test_step_flops_count_every_block_row_and_every_scored_token():
    cfg = ModelConfig(name="t", vocab_size=50, hidden_size=16, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, intermediate_size=24)
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    tc = TrainConfig(exit_weighting="uniform", e_scale=1.0, layerdrop_p_max=0.5,
                     layerdrop_depth="uniform", exit_token_fraction=0.5, bf16=False, batch_size=4)
    x, y = torch.randint(0, 50, (4, 8)), torch.randint(0, 50, (4, 8))
    ran = [0] * 3              # rows each block really ran on, seen by hooks
    for i, layer in enumerate(model.layers):
        layer.register_forward_hook(lambda m, a, out, i=i: ran.__setitem__(i, ran[i] + out.shape[0]))
    work = train_step(ExitObjective(model, tc), make_optimizer(model, tc), tc, x, y, step=3)
    assert work.block_rows == ran and sum(ran) < 12          # LayerDrop skipped rows
    # Weights of a block: q, o (16x16), k, v (16x8), gate, up, down (16x24).
    block = 2 * 256 + 2 * 128 + 3 * 384
    assert work.head_rows == 32 + 2 * 16                     # last exit all, two exits half
    expected = sum(ran) * 8 * (6 * block + 12 * 8 * 16) + work.head_rows * 6 * 16 * 50
    assert step_flops(model, work, 8) == expected
    # The matrix-work floor times exactly the products those FLOPs count, at their shapes.
    pairs = step_products(model, work.block_rows, work.head_rows, 8, torch.float32)
    assert sum(2 * a.numel() * b.shape[-1] for a, b in pairs) == expected
    assert all(a.shape[-1] == b.shape[-2] for a, b in pairs)


def test_step_products_have_the_steps_shapes():
    cfg = ModelConfig(name="t", vocab_size=50, hidden_size=16, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, intermediate_size=24)
    model = Transformer(cfg)
    shapes = sorted((tuple(a.shape), tuple(b.shape))
                    for a, b in step_products(model, [3, 0], 20, 4, torch.float32))
    N, b = 3 * 4, 3 * 2                 # block 0 ran 3 rows of 4 tokens; 2 query heads
    expected = []
    # (out, in) of q, k, v, o, gate, up, down: x W^T, g W, g^T x for each, then the head.
    for n, o, i in [(N, 16, 16), (N, 8, 16), (N, 8, 16), (N, 16, 16), (N, 24, 16),
                    (N, 24, 16), (N, 16, 24), (20, 50, 16)]:
        expected += [((n, i), (i, o)), ((n, o), (o, i)), ((o, n), (n, i))]
    # Attention per query head (head dim 8, T = 4): Q K^T and dO V^T; P V, P^T dO, dS K, dS^T Q.
    expected += [((b, 4, 8), (b, 8, 4))] * 2 + [((b, 4, 4), (b, 4, 8))] * 4
    assert shapes == sorted(expected)


def test_the_training_benchmark_times_both_presets_side_by_side(wikitext_path, data_cache, tmp_path):
    from tinyskip.cli import compose_job
    from tinyskip.training.bench import bench_training, format_table

    job = compose_job("train_bench", [
        f"data.path={wikitext_path}", f"data.cache_dir={data_cache}", "data.max_rows=1000",
        "data.vocab_size=300", "model=l4_d64", "batch_size=4", "seq_len=16", "steps=2",
        "rounds=2", "warmup=1", "peak_size=256", "bf16=false", "compile=false",
        "layerskip.exit_token_fraction=0.5",
        "layerskip.layerdrop_p_max=0.0"])
    assert job.layerskip.exit_weighting == "layerskip" and job.plain.exit_weighting == "none"
    result = bench_training(job)
    plain, layerskip = result["rows"]
    assert (plain["preset"], layerskip["preset"]) == ("plain", "layerskip")
    assert plain["vs_plain"] == 1.0 and layerskip["exit_token_fraction"] == 0.5
    # Without LayerDrop, the layerskip step only adds head work: more model FLOPs per step.
    assert layerskip["gflop_per_step"] > plain["gflop_per_step"] > 0
    assert 0 < plain["mfu_bf16"] and "| layerskip |" in format_table(result)
    assert 0 < plain["matrix_ms"] < plain["ms_per_step"] and 0 < plain["mfu_matrix"]


def test_the_training_benchmark_reports_what_compiled_not_what_was_asked(wikitext_path,
                                                                        data_cache, monkeypatch):
    from tinyskip.cli import compose_job
    from tinyskip.training import bench as train_bench

    asked = []
    monkeypatch.setattr(train_bench, "compile_blocks", lambda model: asked.append(model) or False)
    job = compose_job("train_bench", [
        f"data.path={wikitext_path}", f"data.cache_dir={data_cache}", "data.max_rows=1000",
        "data.vocab_size=300", "model=l4_d64", "batch_size=2", "seq_len=8", "steps=1",
        "rounds=1", "warmup=0", "peak_size=64", "bf16=false", "compile=true"])
    rows = train_bench.bench_training(job)["rows"]
    assert len(asked) == 2 and [r["compile"] for r in rows] == [False, False]


@pytest.mark.parametrize("tied", [True, False])
def test_data_parallel_step_with_layerdrop_and_an_untied_head(tiny_config, tied, tmp_path):
    """DDP with find_unused_parameters (LayerDrop on) must see the head used inside its
    forward: with the loss outside, an untied lm_head's gradient arrived twice."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = Transformer(tiny_config(tie_word_embeddings=tied)).train()
        tc = TrainConfig(exit_weighting="layerskip", e_scale=0.2, layerdrop_p_max=0.5,
                         layerdrop_depth="uniform", bf16=False, batch_size=4)
        ddp = torch.nn.parallel.DistributedDataParallel(ExitObjective(model, tc),
                                                        find_unused_parameters=True)
        opt = make_optimizer(model, tc)
        x, y = torch.randint(0, 97, (4, 16)), torch.randint(0, 97, (4, 16))
        before = model.lm_head.weight.detach().clone()
        for step in range(3):
            train_step(ddp, opt, tc, x, y, step)
        assert not torch.equal(model.lm_head.weight, before)
    finally:
        dist.destroy_process_group()


def test_ranks_sharing_a_batch_score_what_one_process_scores(tiny_model):
    """Two ranks, each holding every other row, draw the earlier exits' positions over
    the global batch: their mean loss (what DDP averages) equals one process's."""
    ids, y = torch.randint(0, 97, (4, 10)), torch.randint(0, 97, (4, 10))
    states = tiny_model(ids, exits=[1, 2, 4], head=False)       # (3, 4, 10, d)
    w, head = torch.tensor([0.2, 0.3, 0.5]), tiny_model.lm_head.weight
    for distill in (0.0, 0.7):
        whole, _, n = sampled_exit_loss(states, head, y, w, 0.3, torch.Generator().manual_seed(1),
                                        distill_weight=distill)
        shards = [sampled_exit_loss(states[:, r::2], head, y[r::2], w, 0.3,
                                    torch.Generator().manual_seed(1), slice(r, None, 2), 4,
                                    distill_weight=distill)
                  for r in (0, 1)]
        torch.testing.assert_close((shards[0][0] + shards[1][0]) / 2, whole)
        assert shards[0][2] + shards[1][2] == n          # every drawn position scored once
        # Seed 1 splits the 12 drawn positions (shared by the earlier exits) unevenly,
        # 3 + 9: dividing by a rank's own count instead of its share would not pass.
        assert shards[0][2] != shards[1][2]


def hand_distillation(states, head, y, w, idx, weight, t):
    """CE of every exit (earlier exit i on positions idx[i], the last on all) + weight *
    the weighted mean of KL(last || exit i) on idx[i], from F.kl_div on whole logits."""
    logits = F.linear(states, head).reshape(states.shape[0], -1, head.shape[0])   # (n, BT, V)
    targets = y.reshape(-1)
    ce = [F.cross_entropy(logits[i, j], targets[j]) for i, j in enumerate(idx)]
    ce.append(F.cross_entropy(logits[-1], targets))
    kl = torch.stack([F.kl_div(F.log_softmax(logits[i, j] / t, dim=-1),
                               F.log_softmax(logits[-1, j].detach() / t, dim=-1),
                               log_target=True, reduction="batchmean") * t * t
                      for i, j in enumerate(idx)])
    return (torch.stack(ce) * w).sum() + weight * (kl * w[:-1]).sum() / w[:-1].sum()


@pytest.mark.parametrize("fraction, t", [(1.0, 1.0), (0.25, 2.0)])
def test_sampled_self_distillation_equals_the_hand_computed_loss_and_gradient(
        tiny_model, fraction, t):
    ids, y = torch.randint(0, 97, (2, 10)), torch.randint(0, 97, (2, 10))
    w = torch.tensor([0.2, 0.3, 0.5])
    head = tiny_model.lm_head.weight
    states = tiny_model(ids, exits=[1, 3, 4], head=False).detach().requires_grad_()
    total, _, _ = sampled_exit_loss(states, head, y, w, fraction,
                                    torch.Generator().manual_seed(5), distill_weight=0.6,
                                    temperature=t)
    got = torch.autograd.grad(total, [states, head])
    g = torch.Generator().manual_seed(5)      # one draw of positions for both earlier exits
    idx = [torch.arange(20) if fraction == 1.0 else torch.randperm(20, generator=g)[:5]] * 2
    ref = hand_distillation(states, head, y, w, idx, 0.6, t)
    torch.testing.assert_close(total, ref)
    for a, b in zip(got, torch.autograd.grad(ref, [states, head])):
        torch.testing.assert_close(a, b)
    # The teacher is detached: the last exit's gradient is the CE's alone.
    plain = sampled_exit_loss(states, head, y, w, fraction, torch.Generator().manual_seed(5))[0]
    torch.testing.assert_close(got[0][-1], torch.autograd.grad(plain, states)[0][-1])
    assert float(total.detach()) > float(plain.detach())


def test_ranks_draw_different_dropout_masks(dropout_model):
    tc = TrainConfig(bf16=False, batch_size=4, lr=1e-9, warmup_steps=0)
    x, y = torch.randint(0, 97, (4, 16)), torch.randint(0, 97, (4, 16))
    losses = []
    for rank in (0, 1):
        model = dropout_model(hidden_dropout=0.1, embedding_dropout=0.1)
        objective = ExitObjective(model.train(), tc)
        losses.append(train_step(objective, make_optimizer(model, tc), tc, x, y, 7,
                                 rank=rank).loss.item())
    assert losses[0] != losses[1]


def test_the_objective_applies_the_runs_distillation_settings(dropout_model):
    """ExitObjective's loss is the sampled exit loss with the run's weight and temperature
    (a dropped setting would train without distillation, silently)."""
    model = dropout_model().eval()
    with torch.no_grad():      # confident exits: at small logits KL * T^2 hardly depends on T
        model.norm.weight.mul_(10)
    x, y = torch.randint(0, 97, (2, 12)), torch.randint(0, 97, (2, 12))
    exits, weights = [1, 3, 4], torch.tensor([0.2, 0.3, 0.5])
    tc = TrainConfig(exit_token_fraction=0.5, distill_weight=0.6, distill_temperature=2.0,
                     batch_size=2)
    loss, _, _ = ExitObjective(model, tc)(x, y, exits, weights, [0.0] * 4,
                                          torch.ones(2, 4), torch.Generator().manual_seed(9))
    states = model(x, exits, [0.0] * 4, torch.ones(2, 4), head=False)
    ref, _, _ = sampled_exit_loss(states, model.lm_head.weight, y, weights, 0.5,
                                  torch.Generator().manual_seed(9), global_batch=2,
                                  distill_weight=0.6, temperature=2.0)
    torch.testing.assert_close(loss, ref)
