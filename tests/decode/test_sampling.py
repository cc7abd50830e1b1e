"""Speculative sampling must leave the full model's output distribution unchanged."""

import math

import pytest
import torch

from tinyskip.config import SSDConfig
from tinyskip.decode import SamplingConfig, generate, ssd_generate
from tinyskip.decode.sampling import logits_to_probs
from tinyskip.model.transformer import Transformer


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper 0.1% point of chi-square with df degrees of freedom (Wilson-Hilferty)."""
    a = 2.0 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def chi2_statistic(samples: list[int], expected: torch.Tensor) -> tuple[float, int]:
    """Pearson chi-square of samples against expected probabilities, pooling bins under 5."""
    n = len(samples)
    counts = torch.bincount(torch.tensor(samples), minlength=expected.numel()).double()
    exp = expected.double() * n
    big = exp >= 5
    obs_b = torch.cat([counts[big], counts[~big].sum()[None]])
    exp_b = torch.cat([exp[big], exp[~big].sum()[None]])
    keep = exp_b > 0
    stat = float(((obs_b[keep] - exp_b[keep]) ** 2 / exp_b[keep]).sum())
    return stat, int(keep.sum()) - 1


@torch.no_grad()
def exact_marginals(model, prompt, s: SamplingConfig):
    """Distributions of the 1st, 2nd and 3rd generated token under full sampling."""
    V = model.config.vocab_size
    p1 = logits_to_probs(model(prompt)[0][0, -1], s)                           # (V,)
    firsts = torch.arange(V)[:, None]
    p2_given = logits_to_probs(model(torch.cat([prompt.expand(V, -1), firsts], 1))[0][:, -1], s)
    pairs = torch.cartesian_prod(torch.arange(V), torch.arange(V))             # (V*V, 2)
    p3_given = logits_to_probs(model(torch.cat([prompt.expand(V * V, -1), pairs], 1))[0][:, -1], s)
    joint12 = p1[:, None] * p2_given                                           # (V, V)
    return p1, joint12.sum(0), joint12.flatten() @ p3_given


@pytest.fixture(scope="module")
def peaked_model(tiny_config):
    """A random tiny model with large weights: peaked next-token distributions whose early
    exits differ strongly from the last (TV about 0.5 at exit 0), so drafts are often
    rejected and a wrong acceptance rule would show."""
    torch.manual_seed(0)
    return Transformer(tiny_config(vocab_size=50, initializer_range=0.2)).eval()


@pytest.mark.parametrize("sampling,draft_layer", [
    (SamplingConfig(temperature=1.0), 1),
    (SamplingConfig(temperature=0.8, top_k=20, top_p=0.9), 2),
])
def test_ssd_sampling_matches_the_full_models_distribution(peaked_model, sampling, draft_layer):
    """Four new tokens with k=3: the first comes from prefill, the 2nd and 3rd from the
    first round's two drafts (accepted, or resampled at a rejection) or its bonus token.
    Their distributions must be the full model's."""
    model = peaked_model
    prompt = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(1))
    expected = exact_marginals(model, prompt, sampling)
    n = 1000

    def samples(decode):
        tokens, drafted, accepted = [[], [], []], 0, 0
        for seed in range(n):
            gen = decode(torch.Generator().manual_seed(seed))
            for position, token in zip(tokens, gen.tokens[0]):
                position.append(token)
            drafted += gen.stats.drafted
            accepted += gen.stats.accepted
        return tokens, drafted, accepted

    cfg = SSDConfig(draft_layer, 3)
    ssd, drafted, accepted = samples(lambda g: ssd_generate(model, prompt, 4, cfg, sampling,
                                                            generator=g))
    # Real drafts were made and the rule had work to do: some rejected, some accepted.
    assert drafted >= 2 * n and 0.1 * drafted < accepted < 0.9 * drafted, (drafted, accepted)
    for got, p in zip(ssd, expected):
        stat, df = chi2_statistic(got, p)
        assert stat < chi2_critical(df), (stat, df)
    # The test has power: sampling from the draft alone (what accepting every draft
    # would give) is told apart from the full model at the 2nd and 3rd tokens.
    draft, _, _ = samples(lambda g: generate(model, prompt, 4, draft_layer, sampling, generator=g))
    for got, p in zip(draft[1:], expected[1:]):
        stat, df = chi2_statistic(got, p)
        assert stat > chi2_critical(df), (stat, df)



@pytest.fixture(scope="module")
def sharp_model(tiny_config):
    """Like peaked_model with still larger weights: the draft's wrong guesses are costlier,
    so a bonus token drawn from the wrong position shows at a few hundred samples."""
    torch.manual_seed(0)
    return Transformer(tiny_config(vocab_size=50, initializer_range=0.3)).eval()


# Three new tokens with k=1: the 1st comes from prefill, the 2nd is the first round's one
# draft (accepted, or resampled at a rejection) and, when that draft is accepted, the 3rd
# is the round's bonus token, drawn from the verifier's distribution one position past the
# draft. (After a rejection one token is left, which a round with no draft gives.) So the
# 3rd token's marginal checks the bonus; the test above (k=3, 4 tokens) only ever draws a
# bonus as the 4th token, which it does not check.
TOP = dict(temperature=0.8, top_k=20, top_p=0.9)


@pytest.mark.parametrize("case,sampling,cfg", [
    # Exit 3 of 4 agrees with the last exit often: about 3 runs in 4 end in a bonus.
    ("plain", SamplingConfig(temperature=1.0), SSDConfig(3, 1)),
    # Adaptive drafting: the draft's top-1 probability (after the processors) is under
    # the threshold in about a third of the runs, which then verify no draft at all.
    ("adaptive", SamplingConfig(**TOP), SSDConfig(3, 1, adaptive_threshold=0.25)),
    # Drafts scored over half of the vocabulary only (q is zero outside it), with the
    # processors applied to the small head's logits.
    ("draft_vocab", SamplingConfig(**TOP), SSDConfig(3, 1, draft_vocab=25)),
])
def test_ssd_sampling_keeps_the_distribution_through_bonus_tokens(sharp_model, case,
                                                                   sampling, cfg):
    model = sharp_model
    prompt = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(1))
    expected = exact_marginals(model, prompt, sampling)
    # Every other token id: leaves out many of the draft's likely tokens, so the residual
    # max(0, p - q) has mass on tokens the draft cannot propose.
    draft_ids = torch.arange(0, 50, 2) if cfg.draft_vocab else None
    n = 600
    tokens, drafted, accepted, bonus_runs = [[], [], []], 0, 0, []
    for seed in range(n):
        gen = ssd_generate(model, prompt, 3, cfg, sampling,
                           generator=torch.Generator().manual_seed(seed), draft_ids=draft_ids)
        out, st = gen.tokens[0], gen.stats
        assert len(out) == 3
        for position, token in zip(tokens, out):
            position.append(token)
        # At most one draft per run (the round after a rejection has room for none), so
        # a run with an accepted draft is a run whose 3rd token is a bonus token.
        assert st.drafted <= 1 and st.accepted <= st.drafted, (st.drafted, st.accepted)
        drafted += st.drafted
        accepted += st.accepted
        if st.accepted:
            bonus_runs.append(seed)
            if draft_ids is not None:             # an accepted draft is from the small vocab
                assert out[1] in draft_ids.tolist(), out
    # The rule had work to do: drafts were proposed, most but not all accepted, and a good
    # share of the 3rd tokens are bonus tokens (none would make this test vacuous).
    assert drafted >= 0.4 * n and 0.1 * drafted < accepted < 0.95 * drafted, (drafted, accepted)
    assert len(bonus_runs) >= 0.3 * n, len(bonus_runs)
    if cfg.adaptive_threshold:
        assert drafted <= 0.9 * n, drafted        # the threshold dropped some drafts
    for i, (got, p) in enumerate(zip(tokens, expected)):
        stat, df = chi2_statistic(got, p)
        assert stat < chi2_critical(df), (case, f"token {i + 1}", stat, df)
    # The test has power: the same runs with each bonus drawn instead from the verifier's
    # distribution at the draft's own position (the 2nd token's, given the 1st) are told
    # apart from the full model at the 3rd token.
    with torch.no_grad():
        seqs = torch.cat([prompt.expand(50, -1), torch.arange(50)[:, None]], 1)
        p_after_first = logits_to_probs(model(seqs)[0][:, -1], sampling)          # (V, V)
    g = torch.Generator().manual_seed(12345)
    shifted = list(tokens[2])
    for seed in bonus_runs:
        shifted[seed] = int(torch.multinomial(p_after_first[tokens[0][seed]], 1, generator=g))
    stat, df = chi2_statistic(shifted, expected[2])
    assert stat > chi2_critical(df), (case, stat, df)



def test_chi2_helpers():
    expected = torch.tensor([0.5, 0.3, 0.2])
    assert chi2_statistic([0] * 50 + [1] * 30 + [2] * 20, expected)[0] == pytest.approx(0.0)
    assert chi2_critical(10) == pytest.approx(29.59, rel=0.01)


def test_lookup_drafts_keep_the_full_models_sampling_distribution(tiny_config):
    """Found drafts are certain (q puts all mass on them): accepted with probability
    p(draft), resampled from p without it otherwise. Three new tokens with k=2."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=50, initializer_range=0.2)).eval()
    sampling = SamplingConfig(temperature=1.0)
    # The first round's key ends with the first sampled token: where that is 3 (after
    # "... 7 8"), "8 3" recurs and the round drafts what followed it before.
    prompt = torch.tensor([[7, 8, 3, 4, 9, 1, 7, 8]])
    expected = exact_marginals(model, prompt, sampling)
    n, tokens, drafted, accepted = 1000, [[], [], []], 0, 0
    for seed in range(n):
        gen = ssd_generate(model, prompt, 3, SSDConfig(1, 2, ngram=2), sampling,
                           generator=torch.Generator().manual_seed(seed))
        for position, token in zip(tokens, gen.tokens[0]):
            position.append(token)
        drafted, accepted = drafted + gen.stats.drafted, accepted + gen.stats.accepted
    assert 0 < accepted < drafted, (drafted, accepted)
    for got, p in zip(tokens, expected):
        stat, df = chi2_statistic(got, p)
        assert stat < chi2_critical(df), (stat, df)


def test_a_certain_draft_is_accepted_with_its_probability_and_resampled_without_it():
    """What a found draft meets in accept_sampled: q puts all mass on it. The output must
    be distributed as p, whatever the draft (likely or not)."""
    from tinyskip.decode.sampling import accept_sampled

    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    n = 20000
    for draft in (0, 3):
        q = [torch.nn.functional.one_hot(torch.tensor(draft), 4).float()]
        gen = torch.Generator().manual_seed(draft)
        firsts = []
        for _ in range(n):
            a, nxt = accept_sampled([draft], q, p, gen)
            firsts.append(draft if a == 1 else nxt)
        stat, df = chi2_statistic(firsts, p[0])
        assert stat < chi2_critical(df), (draft, stat)


def test_batched_ssd_sampling_keeps_each_rows_distribution(peaked_model):
    """Three prompts of different lengths sampled together, four new tokens each, k=3:
    rows accept different numbers of drafts in one round, and every row's first three
    tokens must follow the full model's distribution given its own prompt."""
    from tinyskip.decode.steps import ragged_batch

    model, sampling = peaked_model, SamplingConfig(temperature=1.0)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 50, (n,), generator=g) for n in (6, 2, 9)]
    expected = [exact_marginals(model, p[None], sampling) for p in prompts]
    batch, lengths = ragged_batch(prompts)
    n, drafted, accepted = 500, 0, 0
    tokens = [[[], [], []] for _ in prompts]          # row -> position -> samples
    for seed in range(n):
        gen = ssd_generate(model, batch, 4, SSDConfig(1, 3), sampling,
                           generator=torch.Generator().manual_seed(seed), lengths=lengths)
        for row, out in zip(tokens, gen.tokens):
            for position, token in zip(row, out):
                position.append(token)
        drafted, accepted = drafted + gen.stats.drafted, accepted + gen.stats.accepted
    # Real drafts in every row's first round, some rejected, some accepted.
    assert drafted >= 2 * n * len(prompts) and 0.1 * drafted < accepted < 0.9 * drafted, \
        (drafted, accepted)
    for r, (row, marginals) in enumerate(zip(tokens, expected)):
        for i, (got, p) in enumerate(zip(row, marginals)):
            stat, df = chi2_statistic(got, p)
            assert stat < chi2_critical(df), (f"row {r}", f"token {i + 1}", stat, df)
