import math

import numpy as np
import pytest

from tinyskip.calibration.ltt import (accuracy_level_thresholds, binom_cdf, calibrate_threshold,
                                      f1_loss, fixed_sequence_test, hb_pvalue, min_examples,
                                      mismatch_loss, naive_threshold, risk_consistency_loss,
                                      split_frequency, token_f1)


def comb_cdf(k, n, p):
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


@pytest.mark.parametrize("k,n,p", [(-1, 10, 0.3), (0, 10, 0.3), (3, 10, 0.3), (9, 10, 0.3),
                                   (10, 10, 0.3), (2, 50, 0.1), (5, 200, 0.05), (50, 1000, 0.05)])
def test_binom_cdf_matches_comb_sum(k, n, p):
    assert binom_cdf(k, n, p) == pytest.approx(comb_cdf(k, n, p), rel=1e-9)


def test_hb_pvalue_zero_risk():
    # Both terms are powers of 0.9: Hoeffding's limit exp(100 log 0.9), Bentkus e * 0.9^100.
    assert hb_pvalue(0.0, 100, 0.1) == pytest.approx(0.9**100, rel=1e-9)
    assert 0.9**100 == pytest.approx(2.656e-5, rel=1e-3)


def test_hb_pvalue_hoeffding_wins_by_hand():
    # n=50, R=0.04, delta=0.1: kl(0.04 || 0.1), and ceil(50 * 0.04) = 2.
    h1 = 0.04 * math.log(0.04 / 0.1) + 0.96 * math.log(0.96 / 0.9)
    hoeffding = math.exp(-50 * h1)
    bentkus = math.e * (0.9**50 + 50 * 0.1 * 0.9**49 + 1225 * 0.1**2 * 0.9**48)
    assert hoeffding == pytest.approx(0.28216, rel=1e-4)
    assert bentkus == pytest.approx(0.30371, rel=1e-4)
    assert hb_pvalue(0.04, 50, 0.1) == pytest.approx(min(hoeffding, bentkus), rel=1e-9)


def test_hb_pvalue_bentkus_wins_by_hand():
    # n=100, R=0.05, delta=0.1: the binomial tail up to ceil(100 * 0.05) = 5 is the smaller term.
    h1 = 0.05 * math.log(0.05 / 0.1) + 0.95 * math.log(0.95 / 0.9)
    hoeffding = math.exp(-100 * h1)
    bentkus = math.e * comb_cdf(5, 100, 0.1)
    assert bentkus < hoeffding
    assert hb_pvalue(0.05, 100, 0.1) == pytest.approx(bentkus, rel=1e-9)


def test_hb_pvalue_count_ignores_float_noise():
    # 100 * risk = 5.0000000001 must still count 5 losses, not 6.
    assert hb_pvalue(0.05 + 1e-12, 100, 0.1) == pytest.approx(hb_pvalue(0.05, 100, 0.1), rel=1e-6)


def kl(a, b):
    return a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))


def test_hb_pvalue_bentkus_count_rounds_a_fractional_n_r_up_by_hand():
    # n=100, R=0.049, delta=0.1: n R = 4.9 is no count, and the Bentkus term takes the
    # binomial CDF at ceil(4.9) = 5, which here is the smaller term. Rounding down (4)
    # would give e * P(Bin <= 4) = 0.064, less than half the right p-value.
    hoeffding = math.exp(-100 * kl(0.049, 0.1))
    bentkus = math.e * comb_cdf(5, 100, 0.1)
    assert bentkus == pytest.approx(0.15651, rel=1e-4) and hoeffding == pytest.approx(0.17440, rel=1e-4)
    assert math.e * comb_cdf(4, 100, 0.1) < 0.5 * bentkus        # the case tells 4 from 5
    assert hb_pvalue(0.049, 100, 0.1) == pytest.approx(bentkus, rel=1e-9)


def test_hb_pvalue_fractional_n_r_below_one_half_still_rounds_up_by_hand():
    # n=100, R=0.043: n R = 4.3, so ceil gives 5 (round-to-nearest and floor give 4).
    # With 5 the Bentkus term (0.157) loses to Hoeffding (0.106); with 4 it would win (0.064).
    hoeffding = math.exp(-100 * kl(0.043, 0.1))
    bentkus = math.e * comb_cdf(5, 100, 0.1)
    assert hoeffding == pytest.approx(0.10564, rel=1e-4) and bentkus > hoeffding
    assert math.e * comb_cdf(4, 100, 0.1) < 0.7 * hoeffding      # the case tells 4 from 5
    assert hb_pvalue(0.043, 100, 0.1) == pytest.approx(hoeffding, rel=1e-9)
    # n=25, R=0.092, delta=0.2: n R = 2.3 -> 3; Hoeffding 0.337 against e P(Bin <= 3) = 0.636
    # (P(Bin <= 2) would give 0.267).
    hoeffding = math.exp(-25 * kl(0.092, 0.2))
    assert hoeffding < math.e * comb_cdf(3, 25, 0.2) and math.e * comb_cdf(2, 25, 0.2) < 0.8 * hoeffding
    assert hb_pvalue(0.092, 25, 0.2) == pytest.approx(hoeffding, rel=1e-9)


def test_calibration_pvalue_counts_fractional_losses_by_their_sum():
    # 49 losses of 0.1 among 100: the mean is 0.049, so the count is ceil(4.9) = 5 (not the 49
    # nonzero losses, nor floor 4). Same hand value as the Bentkus case above.
    losses = np.zeros((1, 100))
    losses[0, :49] = 0.1
    out = calibrate_threshold([0.5], losses, 0.1, 0.2)
    assert out["pvalues"] == [pytest.approx(math.e * comb_cdf(5, 100, 0.1), rel=1e-9)]
    assert out["index"] == 0 and out["threshold"] == 0.5      # 0.157 <= epsilon 0.2


@pytest.mark.parametrize("n", [10, 100, 1000])
def test_hb_pvalue_risk_at_or_above_delta_cannot_pass(n):
    for risk in (0.1, 0.3, 1.0):
        assert hb_pvalue(risk, n, 0.1) >= 0.99


def test_hb_pvalue_monotone_in_risk():
    p = [hb_pvalue(r, 100, 0.1) for r in np.linspace(0, 1, 101)]
    assert all(b >= a for a, b in zip(p, p[1:]))
    assert p[0] < 1e-4 and p[-1] == 1.0


def test_min_examples():
    assert min_examples(0.1, 0.05) == 29 == math.ceil(math.log(0.05) / math.log(0.9))
    for delta, eps in [(0.1, 0.05), (0.05, 0.1), (0.5, 0.25), (0.2, 0.01), (0.01, 0.5)]:
        n = min_examples(delta, eps)
        assert hb_pvalue(0.0, n, delta) <= eps
        assert n == 1 or hb_pvalue(0.0, n - 1, delta) > eps


def test_min_examples_at_float_boundaries():
    # eps = (1-delta)^k, give or take one ulp, is where the closed form's ceil can miss by one.
    for delta in (0.01, 0.05, 0.1, 0.15, 0.3):
        for k in range(1, 60):
            for eps in (math.nextafter((1 - delta) ** k, 0), (1 - delta) ** k,
                        math.nextafter((1 - delta) ** k, 1)):
                n = min_examples(delta, eps)
                assert hb_pvalue(0.0, n, delta) <= eps
                assert n == 1 or hb_pvalue(0.0, n - 1, delta) > eps


def test_fixed_sequence_stops_at_first_failure():
    accepted, p = fixed_sequence_test([0.9, 0.8, 0.7, 0.6, 0.5], [0, 0, 0.5, 0, 0], 100, 0.1, 0.05)
    assert accepted == 2 and len(p) == 3 and p[2] > 0.05
    accepted, p = fixed_sequence_test([0.9, 0.8], [0.0, 0.0], 100, 0.1, 0.05)
    assert accepted == 2 and len(p) == 2
    with pytest.raises(ValueError, match="descending"):
        fixed_sequence_test([0.9, 0.9, 0.8], [0, 0, 0], 100, 0.1, 0.05)
    with pytest.raises(ValueError, match="descending"):
        fixed_sequence_test([0.5, 0.9], [0, 0], 100, 0.1, 0.05)


def test_calibrate_looser_delta_never_gives_higher_threshold():
    rng = np.random.default_rng(0)
    thresholds = np.linspace(0.95, 0.05, 19)
    # Lower thresholds exit earlier, so their losses are higher on average.
    rates = np.linspace(0.0, 0.5, len(thresholds))
    losses = (rng.random((len(thresholds), 400)) < rates[:, None]).astype(float)
    chosen = []
    for delta in [0.02, 0.05, 0.1, 0.2, 0.3, 0.5]:
        out = calibrate_threshold(thresholds, losses, delta, 0.05)
        assert out["n"] == 400 and len(out["pvalues"]) <= len(thresholds)
        if out["index"] is not None:
            assert out["threshold"] == thresholds[out["index"]]
            assert max(out["pvalues"][: out["index"] + 1]) <= 0.05
        chosen.append(math.inf if out["threshold"] is None else out["threshold"])
    assert all(b <= a for a, b in zip(chosen, chosen[1:]))
    assert len(set(chosen)) >= 3  # the grid really separates the deltas


def test_calibrate_validation():
    with pytest.raises(ValueError, match="need at least 29"):
        calibrate_threshold([0.9, 0.5], np.zeros((2, 28)), 0.1, 0.05)
    out = calibrate_threshold([0.9, 0.5], np.zeros((2, 29)), 0.1, 0.05)
    assert out["threshold"] == 0.5 and out["index"] == 1
    out = calibrate_threshold([0.9, 0.5], np.ones((2, 29)), 0.1, 0.05)
    assert out["threshold"] is None and out["index"] is None and len(out["pvalues"]) == 1
    with pytest.raises(ValueError, match=r"delta=1.5: must be in \(0, 1\)"):
        calibrate_threshold([0.9], np.zeros((1, 100)), 1.5, 0.05)
    with pytest.raises(ValueError, match="epsilon=0"):
        calibrate_threshold([0.9], np.zeros((1, 100)), 0.1, 0)
    with pytest.raises(ValueError, match=r"epsilon=1.0: must be in \(0, 1\)"):
        calibrate_threshold([0.9], np.zeros((1, 100)), 0.1, 1.0)
    bad = np.tile([-0.5, 0.5], (1, 50))  # mean 0 looks fine, the entries are not
    with pytest.raises(ValueError, match=r"losses must lie in \[0, 1\]"):
        calibrate_threshold([0.9], bad, 0.1, 0.05)


def test_guarantee_holds_as_a_frequency_over_population_risk():
    """P(E[L(chosen)] > delta) <= epsilon, measured on the population risk, not a test half.

    Each example draws one uniform u, and its loss at threshold j is 1[u < mu_j]: the
    population risk at threshold j is exactly mu_j (rising as the threshold falls, like
    exiting earlier), so each draw's violation is known without a noisy held-out mean.
    """
    delta, epsilon, n, draws = 0.1, 0.1, 100, 400
    mu = np.array([0.0, 0.02, 0.04, 0.06, 0.08, 0.095, 0.105, 0.115, 0.13, 0.16, 0.2, 0.3])
    thresholds = np.linspace(0.95, 0.4, len(mu))
    u = np.random.default_rng(0).random((draws, 1, n))
    losses = (u < mu[None, :, None]).astype(np.float64)               # (draws, grid, n)
    chosen = np.array([0.0 if (i := calibrate_threshold(thresholds, x, delta, epsilon)["index"])
                       is None else mu[i] for x in losses])           # never exit: risk 0
    # The count of violations is Binomial(draws, <= epsilon): allow 3 standard deviations.
    slack = 3 * math.sqrt(epsilon * (1 - epsilon) / draws)
    assert np.mean(chosen > delta) <= epsilon + slack
    # Not vacuous: calibration does pick exiting thresholds (risk 0.02-0.08) in most draws.
    # (With p-values a tenth of HB's, every grid value passes: violations in all 400 draws.)
    assert np.mean(chosen > 0) > 0.9


def test_split_frequency_scores_the_held_out_half():
    """Row 1 (17 losses of 1 in 100) is accepted on a calibration half of 50 only when that
    half holds <= 6 of them; the held-out half then holds >= 11, a mean >= 0.22 > delta.
    So every split that picks row 1 violates on its held-out half, while its calibration
    half (<= 0.12) and the whole pool (0.17) never would."""
    delta, epsilon = 0.2, 0.3
    assert hb_pvalue(6 / 50, 50, delta) <= epsilon < hb_pvalue(7 / 50, 50, delta)
    losses = np.zeros((2, 100))
    losses[1, :17] = 1.0                    # row 0 (never far from full) has no loss at all
    out = split_frequency([0.9, 0.5], losses, delta, epsilon, n_splits=200, seed=1)
    assert (out["n_splits"], out["n_cal"], out["n_test"]) == (200, 50, 50)
    t = np.asarray(out["test_losses"])
    assert len(t) == 200
    picked_row1 = t > 0                     # row 0 scores 0 on any half
    # Held-out counts are 11..17 of 50; the calibration half's would be 0..6.
    assert np.all(np.isin(np.round(t[picked_row1] * 50), np.arange(11, 18)))
    # About 14% of random halves hold <= 6 of the 17 (hypergeometric).
    assert out["violation_rate"] == pytest.approx(picked_row1.mean())
    assert 0.05 < out["violation_rate"] < 0.3
    assert out["test_loss_mean"] == pytest.approx(t.mean())


def test_naive_threshold_stops_at_first_failure():
    thresholds = [0.9, 0.7, 0.5, 0.3]
    losses = np.array([[0, 0, 0, 0, 0], [0.2, 0, 0, 0, 0], [0.5, 0, 0, 0, 0], [0.1, 0, 0, 0, 0]])
    assert naive_threshold(thresholds, losses) == 0.7      # means 0, 0.04, 0.1 (fails), 0.02
    assert naive_threshold(thresholds, losses, quality=0.9) == 0.3  # mean 0.1 sits at the bar
    assert naive_threshold(thresholds, losses + 0.5, quality=0.9) is None


def test_accuracy_level_thresholds():
    conf = np.array([[0.9, 0.8, 0.7, 0.6, 0.5], [0.9, 0.8, 0.7, 0.6, 0.5]])
    agree = np.array([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0]])
    # Exit 0 agreement at c = 0.9..0.5: 1, 1, 2/3, 3/4, 3/5.
    assert accuracy_level_thresholds(conf, agree, 0.75) == [0.6, None]
    assert accuracy_level_thresholds(conf, agree, 0.8) == [0.8, None]
    assert accuracy_level_thresholds(conf[:, ::-1], agree[:, ::-1], 0.6) == [0.5, None]
    # Ties: c = 0.5 takes all three tied tokens (rate 1/2), never just the first of them.
    tied_conf, tied_agree = np.array([[0.9, 0.5, 0.5, 0.5]]), np.array([[1, 1, 0, 0]])
    assert accuracy_level_thresholds(tied_conf, tied_agree, 0.5) == [0.5]
    assert accuracy_level_thresholds(tied_conf, tied_agree, 0.6) == [0.9]


def test_token_f1_and_losses():
    assert token_f1([1, 2, 3], [3, 2, 1]) == 1.0
    assert token_f1([1, 2, 2, 3], [2, 2, 4]) == pytest.approx(4 / 7)  # p = 2/4, r = 2/3
    assert token_f1([2, 2], [2]) == pytest.approx(2 / 3)  # a repeat matches only once
    assert token_f1([], []) == 1.0 and token_f1([], [1]) == 0.0 and token_f1([1], [2]) == 0.0
    assert f1_loss([1, 2, 2, 3], [2, 2, 4]) == pytest.approx(3 / 7)
    assert mismatch_loss([1, 2, 3], [1, 5, 3, 4]) == 0.5
    assert mismatch_loss([], []) == 0.0 and mismatch_loss([], [1, 2]) == 1.0
    assert mismatch_loss([1, 2], [1, 2]) == 0.0


def test_risk_consistency_loss():
    assert risk_consistency_loss(0.3, 0.1) == pytest.approx(0.2)
    assert risk_consistency_loss(0.1, 0.3) == 0.0  # beating the full model is free
    assert risk_consistency_loss(1.0, 0.0) == 1.0
    assert risk_consistency_loss(2.0, 0.0) == 1.0
