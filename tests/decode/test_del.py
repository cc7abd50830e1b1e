"""SSD that chooses its draft exit and number of drafts per round (``choose=del``,
decode/chooser.py): the chooser alone, greedy output equal to full decoding's, the
exit modules' caches, and bad candidates."""

import random

import pytest
import torch

from tinyskip.config import ConfigError, SSDConfig, UserError
from tinyskip.decode import generate, ssd_generate
from tinyskip.decode.chooser import DraftChooser, RoundCosts, expected_tokens, round_costs
from tinyskip.decode.stats import DecodeStats
from tinyskip.decode.steps import Steps, positions
from tinyskip.model.exit_modules import ExitModules
from tinyskip.model.exits import ExitHead
from tinyskip.model.transformer import Transformer


# -- the chooser alone ------------------------------------------------------------------

def test_expected_tokens_is_the_geometric_sum():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 3) == 4.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


def test_the_chooser_never_leaves_its_candidates():
    rng = random.Random(0)
    for _ in range(200):
        exits = sorted(rng.sample(range(1, 12), rng.randint(1, 4)))
        k = rng.randint(1, 6)
        costs = RoundCosts({e: rng.uniform(0.1, 5) for e in exits}, rng.uniform(1, 10))
        chooser = DraftChooser(exits, k, costs, 12)
        for e in exits:
            chooser.alpha[e] = rng.random()
        e, drafts = chooser.choose()
        assert e in exits and 0 <= drafts <= k


def test_no_agreement_chooses_a_full_step():
    chooser = DraftChooser([1, 2, 3], 4, RoundCosts({1: 1.0, 2: 2.0, 3: 3.0}, 5.0), 4)
    chooser.alpha = {1: 0.0, 2: 0.0, 3: 0.0}
    assert chooser.choose()[1] == 0


def test_the_chooser_weighs_a_deep_exit_against_a_cheap_one():
    """By hand, c_draft = {1: 1, 3: 3}, c_verify = 5, k = 4. Exit 1 at alpha 0.6: N/C =
    1.6/6, 1.96/7 = 0.280 (best, 2 drafts), 2.176/8. Exit 3 at alpha 0.95 peaks at 4
    drafts, 4.524/17 = 0.266 < 0.280: the cheap exit wins. At alpha 0.99, 4.901/17 =
    0.288 > 0.280: the deep one."""
    chooser = DraftChooser([1, 3], 4, RoundCosts({1: 1.0, 3: 3.0}, 5.0), 4)
    chooser.alpha = {1: 0.6, 3: 0.95}
    assert chooser.choose() == (1, 2)
    chooser.alpha[3] = 0.99
    assert chooser.choose() == (3, 4)


def test_agreement_is_an_exponentially_weighted_mean_from_the_prior():
    chooser = DraftChooser([2], 4, RoundCosts({2: 1.0}, 2.0), 4)
    assert chooser.alpha[2] == 0.5                       # prior e / L
    chooser.update(2, [True, True, False])
    keep = 0.9 ** 3
    assert chooser.alpha[2] == pytest.approx(keep * 0.5 + (1 - keep) * 2 / 3)
    chooser.update(2, [])
    assert chooser.alpha[2] == pytest.approx(keep * 0.5 + (1 - keep) * 2 / 3)


def test_round_costs_count_the_weights_each_call_reads(tiny_model):
    block = sum(p.numel() for p in tiny_model.layers[0].parameters()) * 4
    head = (tiny_model.lm_head.weight.numel() + tiny_model.norm.weight.numel()) * 4
    costs = round_costs(tiny_model, [1, 3], ExitHead(tiny_model))
    assert costs.draft == {1: block + head, 3: 3 * block + head}
    assert costs.verify == 4 * block + 2 * head          # + the probe's head read


def test_a_round_teaches_e_its_own_drafts_and_the_others_their_proposals(tiny_model):
    """E's samples are its drafts up to the first miss; every other candidate's are its
    proposals at the a+1 committed positions; after a full step (no drafts) E's too."""
    from tinyskip.decode.ssd import exit_proposals, learn
    head, row = ExitHead(tiny_model), {1: 0, 2: 1, 3: 2}
    h_seen = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0))
    pos = positions(4, 3, "cpu")
    proposals = exit_proposals(tiny_model, head, h_seen[[0, 2], :3], [1, 3],
                               tiny_model.new_cache(1, 16), pos).tolist()
    target = [proposals[0][0], proposals[0][1], 96, 95]   # exit 1 agrees twice, then not
    want = DraftChooser([1, 2, 3], 4, RoundCosts({1: 1.0, 2: 2.0, 3: 3.0}, 5.0), 4)
    want.update(2, [True, True, False])                   # drafts 7, 8 accepted, 9 not
    for e, got in zip([1, 3], proposals):
        want.update(e, [x == y for x, y in zip(got, target)])
    chooser = DraftChooser([1, 2, 3], 4, RoundCosts({1: 1.0, 2: 2.0, 3: 3.0}, 5.0), 4)
    own = [target[0], target[1], 9]
    stats = DecodeStats()
    learn(tiny_model, chooser, head, 2, own, target, 2, h_seen, row, tiny_model.new_cache(1, 16),
          pos, stats)
    assert chooser.alpha == pytest.approx(want.alpha)
    assert chooser.alpha[1] > 1 / 4 and chooser.alpha[2] != 2 / 4
    assert stats.calls == {"head:6": 1.0}          # one head call over 2 exits x 3 positions
    # A full step: E has no drafts and is probed like the others (one position).
    chooser = DraftChooser([1, 2, 3], 4, RoundCosts({1: 1.0, 2: 2.0, 3: 3.0}, 5.0), 4)
    learn(tiny_model, chooser, head, 2, [], target, 0, h_seen, row, tiny_model.new_cache(1, 16),
          positions(4, 1, "cpu"), DecodeStats())
    assert all(alpha != e / 4 for e, alpha in chooser.alpha.items())


# -- decoding ---------------------------------------------------------------------------

def exit_two_is_exact(tiny_config, **overrides) -> Transformer:
    """A random model whose blocks 2 and 3 add nothing (exits 2, 3 and 4 agree exactly)
    and whose block 1 moves the state a lot (exit 1 disagrees often): drafts from exit 1
    are rejected, from exit 2 accepted, so the chooser has to move. Untied, so that a
    token does not simply predict itself."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(tie_word_embeddings=False, **overrides)).eval()
    with torch.no_grad():
        for i in (2, 3):
            model.layers[i].self_attn.o_proj.weight.zero_()
            model.layers[i].mlp.down_proj.weight.zero_()
        model.layers[1].self_attn.o_proj.weight.mul_(10)
        model.layers[1].mlp.down_proj.weight.mul_(10)
    return model


def prompts(n: int = 4) -> list[torch.Tensor]:
    return [torch.randint(0, 97, (1, 3 + 3 * s), generator=torch.Generator().manual_seed(s))
            for s in range(n)]


def check_equal_to_full(model, cfg: SSDConfig, steps=None, lengths=(1, 7, 40)):
    """Greedy del SSD against full decoding on every prompt and length; the summed
    statistics."""
    total = None
    for prompt in prompts():
        for n in lengths:
            full = generate(model, prompt, n).tokens
            g = ssd_generate(model, prompt, n, cfg, steps=steps)
            assert g.tokens == full, (cfg, n)
            total = g.stats if total is None else total + g.stats
    return total


def assert_choice_moved(stats, exits):
    assert 0 < stats.accepted < stats.drafted           # drafts accepted and rejected
    chosen = [e for e in stats.exit_rounds if e in exits]
    assert len(chosen) > 1, stats.exit_rounds            # more than one exit drafted
    assert set(stats.exit_rounds) <= set(exits) | {4}    # 4 = L: full steps
    assert sum(stats.draft_hist) == sum(stats.exit_rounds.values()) == stats.rounds


@pytest.mark.parametrize("first", [1, None])
def test_greedy_del_equals_full_decoding(tiny_config, first):
    model = exit_two_is_exact(tiny_config)
    stats = check_equal_to_full(model, SSDConfig(first, 4, choose="del", exits=[1, 2, 3]))
    assert_choice_moved(stats, [1, 2, 3])


def test_greedy_del_on_an_untouched_model_equals_full_decoding(tiny_model):
    for eos in (None, 5):
        for prompt in prompts():
            full = generate(tiny_model, prompt, 30, eos_id=eos).tokens
            cfg = SSDConfig(2, 3, choose="del", exits=[1, 2, 3])
            assert ssd_generate(tiny_model, prompt, 30, cfg, eos_id=eos).tokens == full


def test_del_with_a_draft_vocabulary_and_adaptive_drafting_equals_full(tiny_config):
    model = exit_two_is_exact(tiny_config)
    ids = torch.arange(0, 97, 2)
    cfg = SSDConfig(1, 4, adaptive_threshold=0.05, draft_vocab=49, choose="del", exits=[1, 2])
    for prompt in prompts():
        assert ssd_generate(model, prompt, 30, cfg, draft_ids=ids).tokens == \
            generate(model, prompt, 30).tokens


@pytest.mark.parametrize("k,ngram_k", [(4, 0), (2, 6)])
def test_del_with_prompt_lookup_equals_full_and_counts_lookup_rounds_apart(tiny_config, k,
                                                                            ngram_k):
    """Rounds whose context repeats draft the found tokens (up to ngram_k of them, more
    than the k of del's rounds), the others what del chooses. (That lookup rounds also
    teach every exit is checked through the modules' keys:
    test_every_candidate_module_has_keys_at_every_committed_position.)"""
    model = exit_two_is_exact(tiny_config)
    cfg = SSDConfig(1, k, ngram=1, choose="del", exits=[1, 2], ngram_k=ngram_k)
    total = None
    for prompt in prompts():
        repeated = torch.cat([prompt, prompt, prompt], 1)       # repeats to find
        for n in (7, 40):
            g = ssd_generate(model, repeated, n, cfg)
            assert g.tokens == generate(model, repeated, n).tokens
            total = g.stats if total is None else total + g.stats
    assert 0 < total.lookup_rounds < total.rounds
    # Some lookup round committed more drafts than an exit round may propose.
    assert len(total.accept_hist) - 1 > k or not ngram_k
    # Lookup rounds are not exit rounds: the choices count only the others.
    assert sum(total.exit_rounds.values()) == total.rounds - total.lookup_rounds
    assert 0 < total.accepted < total.drafted


def test_a_lookup_round_teaches_every_exit_from_the_probe(tiny_config, monkeypatch):
    """In a lookup round no exit drafted: E, like every candidate, learns a+1 samples from
    the probe at the committed positions, never the found tokens' own agreement."""
    import tinyskip.decode.ssd as ssd_module
    rounds, seen = [], {"lookups": 0}
    real_learn, real_update = ssd_module.learn, DraftChooser.update

    def learn(model, chooser, head, E, own, target, a, *rest):
        stats = rest[-1]
        got = []
        monkeypatch.setattr(DraftChooser, "update",
                            lambda self, e, agree: (agree and got.append((e, len(agree))))
                            or real_update(self, e, agree))     # (no samples: a no-op)
        real_learn(model, chooser, head, E, own, target, a, *rest)
        monkeypatch.setattr(DraftChooser, "update", real_update)
        rounds.append((stats.lookup_rounds > seen["lookups"], own, a, got))
        seen["lookups"] = stats.lookup_rounds

    monkeypatch.setattr(ssd_module, "learn", learn)
    model = exit_two_is_exact(tiny_config)
    for prompt in prompts():
        seen["lookups"] = 0
        ssd_generate(model, torch.cat([prompt, prompt, prompt], 1), 40,
                     SSDConfig(1, 4, ngram=1, choose="del", exits=[1, 2]))
    lookup_rounds = [r for r in rounds if r[0]]
    assert lookup_rounds and len(lookup_rounds) < len(rounds)
    for _, own, a, got in lookup_rounds:
        assert own == [] and sorted(got) == [(1, a + 1), (2, a + 1)]


def test_sampled_del_is_seeded(tiny_config):
    from tinyskip.decode import SamplingConfig
    model = exit_two_is_exact(tiny_config)
    s = SamplingConfig(temperature=1.0)
    run = lambda seed: ssd_generate(model, prompts()[1], 20, SSDConfig(1, 3, choose="del",
                                                                       exits=[1, 2]),
                                    s, generator=torch.Generator().manual_seed(seed))
    a, b = run(3), run(3)
    assert a.tokens == b.tokens and a.stats.exit_rounds == b.stats.exit_rounds
    assert len(a.tokens[0]) == 20


def with_modules(tiny_config, kind: str) -> Transformer:
    """``exit_two_is_exact`` with modules at exits 1 and 2. Exit 2's, initialised from the
    last block (which follows an identity block here), computes exactly what the full
    model does; exit 1's is moved off its initialisation."""
    model = exit_two_is_exact(tiny_config)
    modules = ExitModules(model.config, [1, 2], kind).init_from(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in modules[1].parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.attach_exit_modules(modules)
    return model


@pytest.mark.parametrize("kind", ["block", "attention"])
def test_greedy_del_through_attending_exit_modules_equals_full(tiny_config, kind):
    model = with_modules(tiny_config, kind)
    stats = check_equal_to_full(model, SSDConfig(1, 4, choose="del"))     # [] = [1, 2]
    assert_choice_moved(stats, [1, 2])


@pytest.mark.parametrize("kind,ngram", [("block", 0), ("attention", 0), ("block", 1)])
def test_every_candidate_module_has_keys_at_every_committed_position(tiny_config, kind, ngram,
                                                                     monkeypatch):
    """Whichever exit drafted a position (or none, in a full step or a lookup round), every
    candidate's module holds the keys and values the position's state gives it: those of
    one pass over the whole committed sequence."""
    model = with_modules(tiny_config, kind)
    made = []
    new_cache = model.new_cache
    monkeypatch.setattr(model, "new_cache", lambda *a, **kw: made.append(new_cache(*a, **kw))
                        or made[-1])
    slots = [model.exit_modules[e].self_attn.layer_idx for e in (1, 2)]
    lookups = 0
    for prompt in prompts():
        made.clear()
        if ngram:
            prompt = torch.cat([prompt, prompt], 1)              # a repeat to find
        g = ssd_generate(model, prompt, 30, SSDConfig(1, 4, ngram=ngram, choose="del"))
        assert len(g.stats.exit_rounds) > 1
        lookups += g.stats.lookup_rounds
        # The last token was never run; every position before it was committed.
        seq = torch.cat([prompt, torch.tensor([g.tokens[0][:-1]])], 1)
        n = seq.shape[1]
        ref = new_cache(1, made[0].max_seq_len)
        model.run_layers(model.embed(seq), 0, model.num_layers, ref, 0)
        for slot in slots:
            for got, want in ((made[0].k[slot], ref.k[slot]), (made[0].v[slot], ref.v[slot])):
                torch.testing.assert_close(got[:, :, :n], want[:, :, :n], atol=1e-5, rtol=1e-4)
    assert bool(lookups) == bool(ngram)


def test_capturing_steps_trace_without_graph_breaks(tiny_config):
    model = with_modules(tiny_config, "block")
    steps, cache, head = Steps(model), model.new_cache(1, 32), ExitHead(model)
    tok = torch.tensor([[5]])
    explain = torch._dynamo.explain(steps._token)(tok, 2, cache, positions(3, 1, "cpu"),
                                                  head.weight, head.scale, (), (1,))
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    explain = torch._dynamo.explain(steps._states)(torch.zeros(1, 3, 32), 1, 4, cache,
                                                   positions(3, 3, "cpu"), head.weight,
                                                   head.scale, (), (2,))
    assert explain.graph_break_count == 0 and explain.graph_count == 1


def test_compiled_del_equals_full_decoding(tiny_config):
    model = exit_two_is_exact(tiny_config)
    torch._dynamo.reset()
    steps = Steps(model, compile=True)
    prompt = prompts()[1]
    g = ssd_generate(model, prompt, 16, SSDConfig(1, 2, choose="del", exits=[1, 2]),
                     steps=steps)
    assert g.tokens == generate(model, prompt, 16).tokens
    assert steps.compiled and len(g.stats.exit_rounds) > 1


# -- bad candidates ---------------------------------------------------------------------

@pytest.mark.parametrize("cfg,match", [
    (dict(exits=[0, 2]), r"ssd_exits=\[0, 2\]: 0 is outside 1..3 \(exit 4 is the full model"),
    (dict(exits=[2, 4]), r"ssd_exits=\[2, 4\]: 4 is outside 1..3"),
    (dict(), r"choose=del needs ssd_exits=\[...\] \(candidate exits in 1..3\): this model has "
             "no exit modules"),
    (dict(draft_layer=3, exits=[1, 2]), r"draft_layer=3: the first round's exit must be one "
                                        r"of the candidates \[1, 2\]"),
])
def test_bad_candidates_are_one_clear_error(tiny_model, cfg, match):
    with pytest.raises(UserError, match=match):
        ssd_generate(tiny_model, torch.tensor([[1, 2, 3]]), 5, SSDConfig(choose="del", **cfg))


def test_a_candidate_without_a_module_is_refused_on_a_model_with_modules(tiny_model):
    tiny_model.attach_exit_modules(ExitModules(tiny_model.config, [2], "norm"))
    with pytest.raises(UserError, match=r"ssd_exits=\[1, 2\]: exit 1 has no exit module; this "
                                        r"model's exits with modules are \[2\]"):
        ssd_generate(tiny_model, torch.tensor([[1, 2, 3]]), 5,
                     SSDConfig(choose="del", exits=[1, 2]))


@pytest.mark.parametrize("cfg,match", [
    (dict(exits=[2, 2]), r"ssd_exits=\[2, 2\]: an exit is listed twice"),
    (dict(choose="dell"), r"SSDConfig.choose='dell': must be one of fixed, del"),
])
def test_bad_del_settings_are_refused_with_the_config(cfg, match):
    with pytest.raises(ConfigError, match=match):
        SSDConfig(**{"choose": "del", **cfg})


def test_del_is_refused_for_a_batch(tiny_model):
    with pytest.raises(UserError, match="choose=del chooses the draft exit per prompt: it "
                                        "decodes one prompt at a time"):
        ssd_generate(tiny_model, torch.zeros(2, 3, dtype=torch.long), 5,
                     SSDConfig(choose="del", exits=[1, 2]))
