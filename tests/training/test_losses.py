import math

import pytest
import torch
import torch.nn.functional as F

from tinyskip.config import ConfigError, TrainConfig
from tinyskip.training.cross_entropy import (ChunkedCrossEntropy, LinearCrossEntropy,
                                             linear_cross_entropy, linear_distilled_cross_entropy,
                                             teacher_distribution)
from tinyskip.training.losses import (curriculum_exits, early_exit_loss, exit_kl, exit_scales,
                                      exit_weights, layerdrop_probs)
from tinyskip.training.optim import cosine_lr


def test_loss_with_only_the_last_exit_is_plain_cross_entropy():
    torch.manual_seed(0)
    logits, y = torch.randn(1, 3, 7, 11), torch.randint(0, 11, (3, 7))
    exits, w = exit_weights(TrainConfig(exit_weighting="none"), 6, step=5)
    assert exits == [6] and w.tolist() == [1.0]
    total, per_exit = early_exit_loss(logits, y, w)
    expected = F.cross_entropy(logits[0].reshape(-1, 11), y.reshape(-1))
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(per_exit[0], expected)


def test_per_exit_losses_are_each_exits_cross_entropy():
    logits, y = torch.randn(3, 2, 5, 13), torch.randint(0, 13, (2, 5))
    w = torch.tensor([0.2, 0.3, 0.5])
    total, per_exit = early_exit_loss(logits, y, w)
    for i in range(3):
        torch.testing.assert_close(per_exit[i], F.cross_entropy(logits[i].reshape(-1, 13), y.reshape(-1)))
    torch.testing.assert_close(total, (per_exit * w).sum())


@pytest.mark.parametrize("kind", ["uniform", "linear", "calm", "sum_l", "layerskip"])
@pytest.mark.parametrize("curriculum", ["none", "rotational", "gradual"])
def test_weights_sum_to_one_and_keep_the_last_layer(kind, curriculum):
    cfg = TrainConfig(exit_weighting=kind, e_scale=0.2, curriculum=curriculum, max_steps=120)
    for step in range(0, 120, 7):
        exits, w = exit_weights(cfg, 6, step)
        assert exits[-1] == 6
        assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-6)
        assert (w > 0).all()


def test_exit_scales_follow_their_formulas():
    L, e = 5, 0.5
    assert exit_scales("uniform", L, e) == [0.5, 0.5, 0.5, 0.5, 1.0]
    assert exit_scales("linear", L, e) == [0.5, 1.0, 1.5, 2.0, 5.0]
    assert exit_scales("calm", L, e) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert exit_scales("sum_l", L, e) == [0.0, 0.5, 1.5, 3.0, 10.0]
    # The paper: e(l) = e_scale * sum_{i<=l} i; last = (L-1) + e_scale * sum_{i<=L-2} i.
    assert exit_scales("layerskip", L, e) == [0.0, 0.5, 1.5, 3.0, 4 + 3.0]
    assert exit_scales("none", L, e) == [0, 0, 0, 0, 1.0]


def test_zero_weight_exits_are_not_computed():
    exits, w = exit_weights(TrainConfig(exit_weighting="layerskip", e_scale=0.2), 4, 0)
    assert exits == [2, 3, 4]                  # exit 1 (block 0) has weight 0 in the paper's form
    torch.testing.assert_close(w, torch.tensor([0.2, 0.6, 3.6]) / 4.4)


def test_rotational_curriculum_enables_every_rth_layer_shifted_each_step():
    cfg = TrainConfig(exit_weighting="uniform", curriculum="rotational", curriculum_rotation=3)
    assert curriculum_exits(cfg, 6, 0) == [1, 4, 6]
    assert curriculum_exits(cfg, 6, 1) == [2, 5, 6]
    assert curriculum_exits(cfg, 6, 2) == [3, 6]
    assert curriculum_exits(cfg, 6, 3) == [1, 4, 6]


def test_gradual_curriculum_adds_one_exit_every_T_over_2L_steps():
    cfg = TrainConfig(exit_weighting="uniform", curriculum="gradual", max_steps=120)  # every 10
    assert curriculum_exits(cfg, 6, 0) == [6]
    assert curriculum_exits(cfg, 6, 9) == [6]
    assert curriculum_exits(cfg, 6, 10) == [5, 6]
    assert curriculum_exits(cfg, 6, 35) == [3, 4, 5, 6]
    assert curriculum_exits(cfg, 6, 60) == [1, 2, 3, 4, 5, 6]
    assert curriculum_exits(cfg, 6, 119) == [1, 2, 3, 4, 5, 6]


def test_no_curriculum_uses_every_exit():
    assert curriculum_exits(TrainConfig(exit_weighting="linear"), 4, 3) == [1, 2, 3, 4]


@pytest.mark.parametrize("depth,expected", [
    ("uniform", [1, 1, 1, 1, 1]),
    ("linear", [0, 0.25, 0.5, 0.75, 1]),
    ("exp", [2 ** (l / 4) - 1 for l in range(5)]),
])
def test_layerdrop_depth_shapes(depth, expected):
    cfg = TrainConfig(layerdrop_p_max=0.2, layerdrop_depth=depth, layerdrop_time="constant")
    assert layerdrop_probs(cfg, 5, step=3) == pytest.approx([0.2 * e for e in expected])


def test_layerdrop_time_scale_exp_rises_from_zero_to_one():
    cfg = TrainConfig(layerdrop_p_max=0.1, layerdrop_depth="uniform", layerdrop_time="exp",
                      max_steps=101)
    assert layerdrop_probs(cfg, 3, 0) == [0.0, 0.0, 0.0]
    assert layerdrop_probs(cfg, 3, 50) == pytest.approx([0.1 * (2 ** 0.5 - 1)] * 3)
    assert layerdrop_probs(cfg, 3, 100) == pytest.approx([0.1] * 3)
    assert layerdrop_probs(TrainConfig(), 3, 50) == [0.0, 0.0, 0.0]


def test_exit_kl_is_zero_when_exits_match_the_final_layer_and_positive_otherwise():
    same = torch.randn(1, 2, 4, 9).expand(3, -1, -1, -1)
    torch.testing.assert_close(exit_kl(same), torch.zeros(2), atol=1e-6, rtol=0)
    assert bool((exit_kl(torch.randn(3, 2, 4, 9)) > 0).all())


def test_cosine_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert cosine_lr(cfg, 0) == pytest.approx(0.1)
    assert cosine_lr(cfg, 9) == pytest.approx(1.0)
    assert cosine_lr(cfg, 60) == pytest.approx(0.55)
    assert cosine_lr(cfg, 110) == pytest.approx(0.1)


@pytest.mark.parametrize("field,value", [("curriculum", "random"), ("exit_weighting", "cubic"),
                                         ("layerdrop_depth", "log"), ("layerdrop_time", "lin")])
def test_unknown_schedules_are_refused_with_the_field_name(field, value):
    with pytest.raises(ConfigError, match=f"TrainConfig.{field}='{value}': must be one of"):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_matches_torch_in_value_and_gradient(dtype):
    torch.manual_seed(1)
    logits = (torch.randn(300, 50) * 3).to(dtype)          # 300 rows: chunks and a tail
    y = torch.randint(0, 50, (300,))
    g = torch.rand(300)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    nll = ChunkedCrossEntropy.apply(a, y)
    ref = F.cross_entropy(b.float(), y, reduction="none")
    torch.testing.assert_close(nll, ref)
    (nll * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)
    assert torch.equal(a.detach(), logits)                # inputs are not modified


@pytest.mark.parametrize("bf16", [False, True])
def test_fused_linear_cross_entropy_equals_linear_then_cross_entropy(bf16, monkeypatch):
    # 300 rows over chunks of 64: four whole chunks and a tail.
    monkeypatch.setattr(LinearCrossEntropy, "CHUNK", 64)
    torch.manual_seed(2)
    h0, w0 = torch.randn(300, 16), torch.randn(50, 16) * 0.5
    h0[:100] *= 20              # confident rows: the target's probability rounds to 1 in bf16
    y, g = torch.randint(0, 50, (300,)), torch.rand(300)
    y[:100] = (h0[:100] @ w0.T).argmax(-1)
    grads = []
    for fused in (True, False):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if fused:
                nll = linear_cross_entropy(h, w, y)
            else:
                nll = F.cross_entropy(F.linear(h, w).float(), y, reduction="none")
        (nll * g).sum().backward()
        grads.append((nll.detach(), h.grad, w.grad))
    # bf16: both products round to bf16 (the unfused one once per output, the fused one
    # once per chunk's contribution), so they agree to bf16's precision.
    for fused, unfused in zip(*grads):
        scale = unfused.abs().max().item()
        tol = dict(atol=1e-2 * scale, rtol=2e-2) if bf16 else dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fused, unfused, **tol)
    # The confident rows' gradients are tiny: compared on their own scale.
    fused_h, ref_h = grads[0][1][:100], grads[1][1][:100]
    assert ((fused_h - ref_h).norm(dim=1) <= 0.1 * ref_h.norm(dim=1)).all()
    assert grads[0][1].dtype == grads[0][2].dtype == torch.float32     # fp32 master grads


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_distilled_cross_entropy_equals_linear_then_ce_and_kl(bf16, temperature,
                                                                    monkeypatch):
    # Two exits' students at the same 150 positions: two whole chunks of 64 and a tail each.
    monkeypatch.setattr(LinearCrossEntropy, "CHUNK", 64)
    torch.manual_seed(3)
    h0, t0, w0 = torch.randn(2, 150, 16), torch.randn(150, 16) * 2, torch.randn(50, 16) * 0.5
    y, gn, gk = torch.randint(0, 50, (150,)), torch.rand(2, 150), torch.rand(2, 150)
    out = []
    for fused in (True, False):
        h, t, w = (x.clone().requires_grad_() for x in (h0, t0, w0))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if fused:
                teacher = teacher_distribution(t, w, temperature)
                nll, kl = linear_distilled_cross_entropy(h, teacher, w, y, temperature)
            else:
                z, zt = F.linear(h, w).float(), F.linear(t.detach(), w).float().detach()
                nll = F.cross_entropy(z.transpose(1, 2), y.expand(2, -1), reduction="none")
                kl = F.kl_div(F.log_softmax(z / temperature, -1),
                              F.log_softmax(zt / temperature, -1), log_target=True,
                              reduction="none").sum(-1) * temperature ** 2
        ((nll * gn).sum() + (kl * gk).sum()).backward()
        assert t.grad is None                            # the teacher gets no gradient
        out.append((nll.detach(), kl.detach(), h.grad, w.grad))
    for fused, unfused in zip(*out):
        scale = unfused.abs().max().item()
        tol = dict(atol=1e-2 * scale, rtol=2e-2) if bf16 else dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fused, unfused, **tol)
    assert bool((out[0][1] > 0).all())


@pytest.mark.parametrize("temperature", [1.0, 2.0])     # T = 1 has its own branches
def test_compiled_distillation_kernels_equal_the_eager_ones(temperature, monkeypatch):
    monkeypatch.setattr(LinearCrossEntropy, "CHUNK", 64)     # whole chunks and a tail
    torch.manual_seed(4)
    h0, t0, w0 = torch.randn(2, 150, 16), torch.randn(150, 16), torch.randn(50, 16)
    y, gn, gk = torch.randint(0, 50, (150,)), torch.rand(2, 150), torch.rand(2, 150)
    from torch._dynamo.utils import counters

    out = []
    torch._dynamo.reset()           # graphs from the other temperature would be reused
    counters.clear()
    for compiled in (False, True):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            teacher = teacher_distribution(t0, w, temperature, compiled)
            nll, kl = linear_distilled_cross_entropy(h, teacher, w, y, temperature, compiled)
        ((nll * gn).sum() + (kl * gk).sum()).backward()
        out.append((teacher[0], teacher[1], nll.detach(), kl.detach(), h.grad, w.grad))
    assert counters["stats"]["unique_graphs"] >= 3       # the three kernels really compiled
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, atol=1e-2 * b.abs().max().item(), rtol=2e-2)

