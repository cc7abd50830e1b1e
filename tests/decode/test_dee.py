"""Dynamic early exit: equivalences with full and static decoding, and what each cache
strategy leaves in the deeper layers."""

import math

import pytest
import torch

from tinyskip.config import MEASURE_RANGES, DEEConfig, UserError
from tinyskip.decode import dee_generate, generate
from tinyskip.decode.confidence import decayed_threshold, entropy_confidence, margin
from tinyskip.model.exit_classifier import (exit_examples, load_exit_classifier,
                                            save_exit_classifier, train_exit_classifier)
from tinyskip.model.kv_cache import KVCache


@pytest.fixture(scope="module")
def model_and_prompts(trained_tiny):
    model, corpus, _ = trained_tiny
    test = torch.from_numpy(corpus.tokens["test"][:3000].astype("int64"))
    prompts = [test[s:s + n][None] for s, n in [(0, 12), (700, 3), (1500, 20)]]
    return model, prompts, corpus.eos_id


@pytest.fixture(scope="module")
def classifier(trained_tiny):
    model, corpus, _ = trained_tiny
    states, labels = exit_examples(model, corpus.tokens["train"], [1, 2, 3], 32, 64, seed=0)
    return train_exit_classifier(states, labels, [1, 2, 3], "hash"), states, labels


@pytest.mark.parametrize("cache", ["propagate", "recompute", "copy"])
@pytest.mark.parametrize("measure", sorted(MEASURE_RANGES))
def test_infinite_threshold_is_full_decoding(model_and_prompts, classifier, measure, cache):
    model, prompts, eos = model_and_prompts
    cfg = DEEConfig(measure, [math.inf], cache=cache)
    for prompt in prompts:
        full = generate(model, prompt, 20, eos_id=eos)
        dee = dee_generate(model, prompt, 20, cfg, eos_id=eos, classifier=classifier[0])
        assert dee.tokens == full.tokens
        assert dee.stats.mean_exit == model.num_layers


@pytest.mark.parametrize("measure", ["softmax", "margin", "entropy"])
def test_a_threshold_every_token_passes_exits_at_the_first_checked_exit(model_and_prompts, measure):
    model, prompts, _ = model_and_prompts
    cfg = DEEConfig(measure, [0.0], exits=[2, 3])
    for prompt in prompts:
        dee = dee_generate(model, prompt, 15, cfg)
        # Every token but the first (from prefill) leaves at exit 2: that is static exit 2,
        # whose first token also comes from the full model's prefill.
        assert dee.stats.exit_hist[2] == 14 and dee.stats.exit_hist[4] == 1
        static_from_second = generate(model, torch.cat([prompt, torch.tensor(
            [dee.tokens[0][:1]])], 1), 14, exit_layer=2).tokens[0]
        assert dee.tokens[0][1:] == static_from_second


def test_relative_measures_cannot_exit_at_the_first_checked_exit(model_and_prompts):
    model, prompts, _ = model_and_prompts
    for measure in ("repeat", "convergence", "saturation"):
        lo = MEASURE_RANGES[measure][0]
        dee = dee_generate(model, prompts[0], 10, DEEConfig(measure, [lo], exits=[1, 2]))
        assert dee.stats.exit_hist[1:3] == [0, 9], measure


def _full_pass_kv(model, ids):
    """Keys and values of every layer from one uncached-equivalent pass over ids (1, S)."""
    cache = KVCache(model.config, 1, ids.shape[1])
    model.run_layers(model.embed(ids), 0, model.num_layers, cache, 0)
    return cache


def _dee_with_cache(model, prompt, n, cfg):
    cache = KVCache(model.config, 1, prompt.shape[1] + n)
    g = dee_generate(model, prompt, n, cfg, cache=cache)
    return g.tokens[0], cache


def test_propagate_fills_deeper_layers_from_the_exit_state(model_and_prompts):
    model, prompts, _ = model_and_prompts
    prompt = prompts[2]
    T, L = prompt.shape[1], model.num_layers
    tokens, cache = _dee_with_cache(model, prompt, 12, DEEConfig("softmax", [0.0], exits=[2]))
    # Token j (j >= 1) sits at position T+j-1 and left after 2 blocks: blocks 2, 3 hold keys
    # projected from its exit state h_2, which blocks [0, 2) of a full pass reproduce.
    ids = torch.cat([prompt, torch.tensor([tokens[:-1]])], 1)
    with torch.no_grad():
        h2 = model.run_layers(model.embed(ids), 0, 2, KVCache(model.config, 1, ids.shape[1]), 0)
        ref = KVCache(model.config, 1, ids.shape[1])
        model.propagate_kv(h2, 2, L, ref, 0)
    sl = slice(T, T + len(tokens) - 1)       # positions of the exited tokens that ran blocks
    for layer in (2, 3):
        torch.testing.assert_close(cache.k[layer][:, :, sl], ref.k[layer][:, :, sl])
        torch.testing.assert_close(cache.v[layer][:, :, sl], ref.v[layer][:, :, sl])
        assert cache.k[layer][:, :, sl].abs().sum() > 0
    # The same entries computed by hand from the blocks' weights, without propagate_kv
    # (which the reference above shares with the decoder): block i reads its own input
    # norm of h_2, then its k_proj / v_proj, and rotates the keys by absolute position.
    for layer in (2, 3):
        k, v = _hand_kv(model, model.layers[layer], h2)
        torch.testing.assert_close(cache.k[layer][:, :, sl], k[:, :, sl], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cache.v[layer][:, :, sl], v[:, :, sl], atol=1e-5, rtol=1e-4)
    # Block 2's own input at the prompt's positions is h_2 too: there the hand computation
    # meets what prefill's ordinary block call wrote, which checks the hand formula itself.
    k, v = _hand_kv(model, model.layers[2], h2)
    torch.testing.assert_close(cache.k[2][:, :, :T], k[:, :, :T], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cache.v[2][:, :, :T], v[:, :, :T], atol=1e-5, rtol=1e-4)


def _hand_kv(model, block, h):
    """Keys and values (1, n_kv, S, hd) block ``block`` projects from states h (1, S, d) at
    positions 0..S-1, written out from its weights: RMSNorm, projections, then RoPE in
    Hugging Face's rotate-half layout with frequencies from rope_theta."""
    cfg = model.config
    assert cfg.rope_scaling is None            # plain RoPE: the formula below is the whole of it
    n_kv, hd = cfg.num_key_value_heads, cfg.head_dim
    S = h.shape[1]
    with torch.no_grad():
        x = h.double()
        x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)
        x = x * block.input_layernorm.weight.double()
        attn = block.self_attn
        k = (x @ attn.k_proj.weight.double().T).view(1, S, n_kv, hd).transpose(1, 2)
        v = (x @ attn.v_proj.weight.double().T).view(1, S, n_kv, hd).transpose(1, 2)
        inv_freq = cfg.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        angle = torch.arange(S, dtype=torch.float64)[:, None] * inv_freq        # (S, hd/2)
        cos, sin = angle.cos(), angle.sin()
        k1, k2 = k[..., : hd // 2], k[..., hd // 2:]
        k = torch.cat([k1 * cos - k2 * sin, k2 * cos + k1 * sin], -1)
    return k.float(), v.float()


def _mixed_depth_run(model, prompt, measure):
    """A recompute config (and its run) whose tokens leave at several depths, so that
    deeper layers have positions to catch up. Which thresholds do that depends on the
    trained model, so they are searched: for ``repeat``, exit 2 or 3 when its argmax
    repeats an earlier exit's; for ``softmax``, per-exit thresholds at exits 1 and 3."""
    L = model.num_layers
    if measure == "repeat":
        candidates = [DEEConfig("repeat", [1.0], exits=e, cache="recompute")
                      for e in ([1, 2], [1, 3], [2, 3])]
    else:
        grid = (0.03, 0.04, 0.045, 0.05, 0.06, 0.08, 0.1)
        candidates = [DEEConfig("softmax", [a, 1.0, b], exits=[1, 2, 3], cache="recompute")
                      for a in grid for b in grid]
    for cfg in candidates:
        g = dee_generate(model, prompt, 30, cfg)
        if sum(c > 0 for c in g.stats.exit_hist[1:L]) >= 1 and g.stats.exit_hist[L] < 30 and \
                any(k.startswith("layer:") and k != "layer:1" for k in g.stats.calls):
            return cfg, g
    pytest.fail(f"no {measure} config leaves at mixed depths on this model")


@pytest.mark.parametrize("measure", ["repeat", "softmax"])
def test_recompute_gives_deeper_layers_the_keys_of_a_full_pass(model_and_prompts, measure):
    model, prompts, _ = model_and_prompts
    prompt = prompts[0]
    T, L = prompt.shape[1], model.num_layers
    cfg, g = _mixed_depth_run(model, prompt, measure)
    tokens, cache = _dee_with_cache(model, prompt, 30, cfg)
    ids = torch.cat([prompt, torch.tensor([tokens[:-1]])], 1)
    ref = _full_pass_kv(model, ids)
    S = ids.shape[1]
    # The deepest exit a generated token took: blocks below it are caught up for every
    # position but a short waiting suffix; blocks at or above it never ran past the prompt.
    deepest = max(e for e, c in enumerate(g.stats.exit_hist[:L]) if c) if g.stats.exit_hist[L] == 1 \
        else L
    for layer in range(L):
        written = [bool(cache.k[layer][0, :, p].abs().sum() > 0) for p in range(S)]
        # Entries still missing are the waiting suffix at the end of the generation.
        first_hole = written.index(False) if False in written else S
        assert first_hole >= T and not any(written[first_hole:]), (layer, written)
        assert first_hole > S - 8 if layer < deepest else first_hole == T, (layer, first_hole)
        torch.testing.assert_close(cache.k[layer][0, :, :first_hole], ref.k[layer][0, :, :first_hole],
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cache.v[layer][0, :, :first_hole], ref.v[layer][0, :, :first_hole],
                                   atol=1e-5, rtol=1e-4)


def test_recompute_keeps_greedy_output_closer_to_full_than_copy(model_and_prompts):
    model, prompts, _ = model_and_prompts
    full = generate(model, prompts[0], 30).tokens[0]
    agree = {}
    for cache in ("recompute", "copy"):
        out = dee_generate(model, prompts[0], 30, DEEConfig("repeat", [1.0], exits=[1, 2],
                                                           cache=cache)).tokens[0]
        agree[cache] = sum(a == b for a, b in zip(out, full))
    assert agree["recompute"] >= agree["copy"]


def test_decaying_threshold_decays_with_the_step():
    values = [decayed_threshold(0.9, t, 64, 4.0) for t in range(0, 65, 8)]
    assert values[0] == pytest.approx(0.9)
    assert all(a > b for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(0.9 * (0.9 + 0.1 * math.exp(-4)))
    assert decayed_threshold(0.9, 30, 64, 0.0) == 0.9


def test_the_decoder_lowers_a_decaying_threshold_step_by_step(model_and_prompts):
    """CALM's schedule lambda * (0.9 + 0.1 exp(-tau t / N)) at generation step t must reach
    the exit decisions, not only the helper: a threshold no step passes undecayed lets
    tokens leave once it has decayed, exactly at the steps the schedule admits."""
    model, prompts, _ = model_and_prompts
    prompt, n, tau, E = prompts[0], 30, 4.0, 2
    T = prompt.shape[1]

    def step_confidences(tokens):
        """Top-1 probability at exit E at each step t = 1..n-1, which runs the token
        tokens[t-1] at position T+t-1. Blocks [0, E) run on every token whatever exit it
        takes, so a plain causal pass over the sequence gives their states; the exit's
        greedy tokens come with them."""
        ids = torch.cat([prompt, torch.tensor([tokens[:-1]])], 1)
        with torch.no_grad():
            h = model.run_layers(model.embed(ids), 0, E)
            probs = torch.softmax(model.head_at(h, E).float(), -1)[0, T:]
        return probs.max(-1).values.tolist(), probs.argmax(-1).tolist()

    full = generate(model, prompt, n).tokens[0]
    # Just above every step's confidence on the full model's path: undecayed, no token
    # leaves early (checked), so an undecayed decoder would follow that path throughout.
    lam = max(step_confidences(full)[0]) * 1.001
    const = dee_generate(model, prompt, n, DEEConfig("softmax", [lam], exits=[E]))
    assert const.tokens[0] == full and const.stats.exit_hist[E] == 0
    # The schedule, written out (t = tokens generated so far, N = tokens asked for).
    thr = {t: lam * (0.9 + 0.1 * math.exp(-tau * t / n)) for t in range(1, n)}
    assert thr[n - 1] < 0.91 * lam
    dee = dee_generate(model, prompt, n, DEEConfig("softmax", [lam], exits=[E], decay_tau=tau))
    out = dee.tokens[0]
    assert len(out) == n
    conf, exit_tokens = step_confidences(out)
    # Steps the schedule admits (with a margin for rounding between this pass and the
    # decoder's one-token steps): their count is the decoder's, and each emitted exit E's
    # greedy token.
    sure = [t for t in range(1, n) if conf[t - 1] >= thr[t] + 1e-5]
    maybe = [t for t in range(1, n) if conf[t - 1] >= thr[t] - 1e-5]
    assert len(sure) >= 3, (conf, thr)
    assert len(sure) <= dee.stats.exit_hist[E] <= len(maybe), (dee.stats.exit_hist, sure, maybe)
    assert dee.stats.exit_hist[E] + dee.stats.exit_hist[model.num_layers] == n
    for t in sure:
        assert out[t] == exit_tokens[t - 1], t
    # Undecayed, none of them would have left (the decay lowered the bar), and the first
    # step that leaves comes after some that stayed: the bar started higher.
    assert all(conf[t - 1] < lam for t in sure), [conf[t - 1] for t in sure]
    assert min(sure) > 1 and all(conf[t - 1] < lam for t in range(1, min(sure) + 1))


def test_confidence_measures_on_known_distributions():
    p = torch.tensor([0.7, 0.2, 0.1, 0.0])
    assert margin(p) == pytest.approx(0.5)
    assert entropy_confidence(torch.full((8,), 1 / 8)) == pytest.approx(0.0, abs=1e-6)
    assert entropy_confidence(torch.tensor([1.0, 0, 0, 0])) == pytest.approx(1.0)


@pytest.mark.parametrize("args,kwargs,message", [
    (("softmax", [1.5]), dict(), r"threshold=1.5: outside the range \[0.0, 1.0\] of measure=softmax"),
    (("entropy", [-0.1]), dict(), "outside the range"),
    (("bogus", [0.5]), dict(), "measure='bogus': must be one of softmax"),
    (("softmax", [0.5]), dict(cache="share"), "cache='share': must be one of"),
    (("softmax", [0.5]), dict(exits=[4]), r"exits=\[4\]: checked exits must be increasing and in 1..3"),
    (("softmax", [0.9, 0.2]), dict(exits=[3, 1]), r"exits=\[3, 1\]: checked exits must be increasing"),
    (("softmax", [0.5]), dict(check_every=4), "check_every=4: checks no exit of this 4-layer model"),
    (("saturation", [-0.5]), dict(decay_tau=4.0), "decay_tau=4.0 with threshold=\\[-0.5\\]"),
    (("softmax", [0.5, 0.4]), dict(), "give one value or one per checked exit"),
    (("softmax", []), dict(), "mode=dee needs threshold="),
    (("classifier", [0.5]), dict(), "measure=classifier needs a trained exit classifier"),
])
def test_bad_dee_options_are_refused(tiny_model, args, kwargs, message):
    """Field checks when the config is built, model checks when it decodes: either way
    one UserError naming the option."""
    with pytest.raises(UserError, match=message):
        dee_generate(tiny_model, torch.tensor([[1, 2, 3]]), 4, DEEConfig(*args, **kwargs))


def test_exit_classifier_separates_agreeing_from_disagreeing_exits(classifier):
    clf, states, labels = classifier
    for i, e in enumerate(clf.exits):
        conf = torch.tensor([clf.confidence(e, h) for h in states[i]])
        agree, disagree = conf[labels[i] > 0], conf[labels[i] == 0]
        assert 0 < len(agree) < len(conf)
        # P(exit agrees) is higher, on average, where the exit does agree.
        assert agree.mean() > disagree.mean() + 0.1, e


def test_a_classifier_every_token_passes_exits_at_the_first_checked_exit(model_and_prompts,
                                                                         classifier):
    model, prompts, _ = model_and_prompts
    dee = dee_generate(model, prompts[0], 10, DEEConfig("classifier", [0.0], exits=[2, 3]),
                       classifier=classifier[0])
    assert dee.stats.exit_hist[2] == 9
    assert dee.stats.head_evals == 10            # no head call for a check: one per token


def test_exit_classifier_file_round_trips_and_is_refused_for_other_weights(classifier, tmp_path):
    clf = classifier[0]
    save_exit_classifier(clf, tmp_path / "clf.safetensors")
    back = load_exit_classifier(tmp_path / "clf.safetensors", "hash")
    assert back.exits == clf.exits and torch.equal(back.weight, clf.weight)
    with pytest.raises(UserError, match="was trained on other weights"):
        load_exit_classifier(tmp_path / "clf.safetensors", "other")
