"""Unlearning metrics against values worked out by hand from their references' rules.

Forgetting quality F: google-deepmind/unlearning_evaluation, metric.py (the NeurIPS 2023 unlearning
challenge). With M models per side, rates are multiples of 1/M; an attack's epsilon is
``max(log((1 - d - FPR) / FNR), log((1 - d - FNR) / FPR))`` clipped at 0, an attack with exactly one
zero rate is dropped, and both zero is perfect (epsilon capped at 50). Points per example: 1 for
eps in [0, 0.5), 1/2 in [0.5, 1), 1/4 in [1, 1.5), ..., while the bin ends at or below ceil(log(M - 1)).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from torch import nn

from approx.metrics import (
    EPSILON_CAP,
    Evaluation,
    evaluate,
    example_epsilon,
    forgetting_quality,
    js_divergence,
    jsdiv_bad_teaching,
    logit_scaled_confidence,
    mia_entropy_ssd,
    mia_loss_starting_kit,
    prediction_entropy,
    softmax,
    zrf_score,
)
from sisa_ray.core.data import SampleSet

D = 1e-5  # the challenge's delta


def column(values) -> np.ndarray:
    """One forget example seen by len(values) models: shape (n_models, 1)."""
    return np.asarray(values, dtype=np.float64)[:, None]


# -- the statistic ---------------------------------------------------------------------------------


def test_statistic_is_log_odds_of_the_true_class_not_the_margin():
    z = np.array([[2.0, 5.0, 1.0], [2.0, 5.0, 1.0]])
    # log p_y - log(1 - p_y) = z_y - log(sum of exp of the other logits)
    expected = [5 - math.log(math.exp(2) + math.exp(1)), 2 - math.log(math.exp(5) + math.exp(1))]
    np.testing.assert_allclose(logit_scaled_confidence(z, np.array([1, 0])), expected, rtol=1e-12)
    # the logit margin would be 3 and -3


def test_statistic_is_stable_and_floored_as_the_reference():
    # p_wrong = e^-30: a naive 1 - p_y loses it; the log-space value is exactly 30
    z = np.array([[30.0, 0.0], [30.0, 0.0]])
    np.testing.assert_allclose(logit_scaled_confidence(z, np.array([0, 1])), [30.0, -30.0], rtol=1e-12)
    # p_wrong = e^-1000 is far below the reference's 1e-45 floor: log(1) - log(1e-45) = 45 log 10
    z = np.array([[1000.0, 0.0], [1000.0, 0.0]])
    np.testing.assert_allclose(logit_scaled_confidence(z, np.array([0, 1])),
                               [45 * math.log(10), -45 * math.log(10)], rtol=1e-9)


# -- epsilon and F: hand-worked cases ---------------------------------------------------------------


def test_interval_attack_hand_value():
    # Unlearned values sit between the two modes of the retrained ones; M = 4.
    u = column([-0.1, 0.0, 0.1, 2.95])
    r = column([-3.0, -2.9, 2.9, 3.0])
    # Medians 0.05 > 0.0: the unlearned side is "positive" for threshold attacks (value >= t).
    # Best threshold t in (-0.1, 0]: FNR = 1/4 (-0.1 below), FPR = 2/4 (2.9, 3.0 above):
    #   eps = log((1 - d - 1/2) / (1/4)) = log(2 - 4d) = 0.693 -> 1/2 point on its own.
    # Interval attacks: the peakier side (unlearned, spread 3.05 < 6.0) is "positive" inside [l, r].
    # [l, r] with l in (-0.1, 0] and r in [2.95, 3.0) (reachable: r within max(u) +- 2,
    # l within r - 3.05 +- 2) holds 0, 0.1, 2.95 and 2.9: FNR = 1/4, FPR = 1/4:
    #   eps = log((1 - d - 1/4) / (1/4)) = log(3 - 4d) = 1.0986. An attack with FNR = 0 or
    # FPR = 0 is dropped, so no attack does better.
    assert example_epsilon(u, r) == pytest.approx(math.log(3 - 4 * D), rel=1e-6)
    # ceil(log(3)) = 2, so bins up to [1.5, 2): eps = 1.0986 is in [1, 1.5) -> 1/4 point
    assert forgetting_quality(u, r) == 0.25


def test_threshold_attack_hand_value():
    # The retrained side (median 13.5 > -7.5) is positive for thresholds: t in (5, 12] gives
    # FNR = 1/4 (0 below), FPR = 1/4 (13 above): eps = log(3 - 4d) = 1.0986 -> 1/4 point.
    u = column([-30.0, -20.0, 5.0, 13.0])
    r = column([0.0, 12.0, 15.0, 20.0])
    # Intervals (positive: the retrained side, spread 20 < 43) end within 20 +- 2 and start
    # within 0 +- 4, so they hold 5 or 13 with 12, 15: at best FNR = 1/4, FPR = 2/4 -> log(2 - 4d).
    assert example_epsilon(u, r) == pytest.approx(math.log(3 - 4 * D), rel=1e-6)
    assert forgetting_quality(u, r) == 0.25


def test_threshold_attack_counts_values_equal_to_the_threshold():
    # The last threshold is the overall maximum, 10, exactly. "value >= 10" flags the retrained
    # 10, 10, 10 (FNR = 1/4) and the unlearned 10 (FPR = 1/4): eps = log(3 - 4d). The threshold
    # before it (10 - 10/999) also flags 9.995 (FPR = 2/4: log(2 - 4d)). Intervals (positive: the
    # retrained side, spread 8 < 10) start within 10 - 8 +- 2 = [0, 4], so they hold 9.995 too.
    u, r = column([0.0, 1.0, 9.995, 10.0]), column([2.0, 10.0, 10.0, 10.0])
    assert example_epsilon(u, r) == pytest.approx(math.log(3 - 4 * D), rel=1e-6)
    assert forgetting_quality(u, r) == 0.25


def test_equal_medians_make_the_unlearned_side_positive():
    # M = 3, medians 6 = 6: the unlearned side is positive for thresholds ("value >= t"); equal
    # spreads (2 = 2) make the other side, the retrained one, positive inside intervals.
    u, r = column([5.0, 6.0, 7.0]), column([4.0, 6.0, 6.0])
    # Thresholds: t in (5, 6] has FNR = 1/3, FPR = 2/3 -> eps < 0 -> 0; others drop out.
    # Interval [l, r] with l in (5, 6], r in [6, 7) holds the retrained 6, 6 and the unlearned 6:
    # FNR = 1/3, FPR = 1/3 -> eps = log((1 - d - 1/3) / (1/3)) = log(2 - 3d) -> bin [0.5, 1).
    assert example_epsilon(u, r) == pytest.approx(math.log(2 - 3 * D), rel=1e-6)
    assert forgetting_quality(u, r) == 0.5
    # The other way round, no attack beats eps = 0 (ceil(log 2) = 1: one point)
    assert forgetting_quality(r, u) == 1.0


def test_degenerate_spread_gets_the_capped_epsilon():
    r = column([0.0, 5.0, 5.0, 10.0])  # spread 10
    # A spike: spread 0 < 1% of 10 -> eps = 50 -> 0 points. (The attacks alone would give 0:
    # any attack holding the spike has FNR = 0 and is dropped; the rest have FNR = 1 -> eps 0.)
    assert example_epsilon(column([5.0] * 4), r) == EPSILON_CAP
    assert forgetting_quality(column([5.0] * 4), r) == 0.0
    # spread 0.09 is still under 1% of 10
    assert forgetting_quality(column([4.95, 5.0, 5.0, 5.04]), r) == 0.0
    # spread 0.2 is 2%: the attacks decide. Medians tie (5 = 5): the unlearned side is positive.
    # Interval [4.9, 5] (r end in [5, 5.1), reachable: within 5.1 +- 2) holds 4.9, 5, 5 and the
    # two retrained 5s: FNR = 1/4, FPR = 2/4 -> eps = log((1 - d - 1/2) / (1/4)) = log(2 - 4d)
    # -> bin [0.5, 1) -> 1/2 point. Threshold attacks at best reach eps 0 here.
    u = column([4.9, 5.0, 5.0, 5.1])
    assert example_epsilon(u, r) == pytest.approx(math.log(2 - 4 * D), rel=1e-6)
    assert forgetting_quality(u, r) == 0.5


def test_points_stop_at_ceil_log_of_m_minus_1():
    # M = 8; the retrained side has the larger median and is positive for thresholds.
    u = column([0, 1, 2, 3, 4, 5, 6, 8])
    r = column([7, 9, 10, 11, 12, 13, 14, 15])
    # t in (7, 8]: FNR = 1/8 (7 below), FPR = 1/8 (8 above): eps = log((1 - d - 1/8) / (1/8))
    # = log(7 - 8d) = 1.9459, the largest finite epsilon 8 models can show.
    assert example_epsilon(u, r) == pytest.approx(math.log(7 - 8 * D), rel=1e-6)
    # ceil(log(7)) = 2: bins [0, .5) [.5, 1) [1, 1.5) [1.5, 2) -> 1/8 point
    assert forgetting_quality(u, r) == 0.125
    # Bins of 0.75 end at 0.75, 1.5, and 2.25 > 2 is not a bin: eps = 1.9459 earns nothing
    # (floor(eps / 0.75) alone would give 1/4).
    assert forgetting_quality(u, r, bin_width=0.75) == 0.0
    # M = 2: ceil(log(1)) = 0, no bin at all: even identical models score 0
    assert forgetting_quality(column([0.0, 1.0]), column([0.0, 1.0])) == 0.0
    # M = 3: ceil(log(2)) = 1; identical models give eps 0 -> 1 point
    assert forgetting_quality(column([0.0, 1.0, 2.0]), column([0.0, 1.0, 2.0])) == 1.0


def test_two_identical_spikes_are_indistinguishable():
    # Both spreads 0: 0 / 0 is not under 1%, and every attack is dropped (the reference fails
    # there); epsilon is 0 -> 1 point with M = 3.
    assert example_epsilon([1.0, 1.0, 1.0], [1.0, 1.0, 1.0]) == 0.0
    assert forgetting_quality(column([1.0] * 3), column([1.0] * 3)) == 1.0


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="n_models, n_forget_examples"):
        forgetting_quality(np.zeros((4, 3)), np.zeros((5, 3)))


# -- the values the reference gives on synthetic arrays (checked against metric.py itself) ---------


def test_epsilons_equal_the_reference_bit_for_bit():
    # Values on a grid of 0.5, so many fall on each other and on thresholds. The expected list is
    # what google-deepmind/unlearning_evaluation's _get_epsilons (float32 rates) returns on them.
    rng = np.random.default_rng(7)
    u = np.round(rng.normal(size=(8, 16)) * 2) / 2
    r = np.round((rng.normal(size=(8, 16)) * rng.uniform(0.3, 3, 16) + rng.uniform(-3, 3, 16)) * 2) / 2
    expected = [1.9458987712860107, 1.7917461395263672, 0.9162747263908386, 1.609421968460083,
                1.9458987712860107, 1.098585605621338, 1.9458987712860107, 0.6931071281433105,
                1.9458987712860107, 1.7917461395263672, 1.7917461395263672, 0.6931071281433105,
                1.9458987712860107, 1.7917461395263672, 1.9458987712860107, 1.9458987712860107]
    assert [example_epsilon(u[:, j], r[:, j]) for j in range(16)] == expected
    assert forgetting_quality(u, r) == 0.203125


def test_integer_epsilons_equal_the_reference_bit_for_bit():
    # Integers with M = 4: interval ends land on data values (inclusive ends matter).
    rng = np.random.default_rng(2)
    u = rng.integers(0, 8, size=(4, 24)).astype(float)
    r = (rng.integers(0, 8, size=(4, 24)) * rng.integers(1, 3, 24) + rng.integers(-3, 4, 24)).astype(float)
    a, b, c = 1.0985989570617676, 0.6931271553039551, EPSILON_CAP  # log(3 - 4d), log(2 - 4d) in float32
    expected = [a, a, a, b, a, c, 0.0, a, b, b, b, a, a, a, a, a, a, b, a, a, a, b, b, b]
    assert [example_epsilon(u[:, j], r[:, j]) for j in range(24)] == expected
    assert forgetting_quality(u, r) == pytest.approx(0.3541666666666667, rel=1e-15)


def test_same_distribution_with_32_models():
    rng = np.random.default_rng(0)
    u, r = rng.normal(size=(32, 10)), rng.normal(size=(32, 10))
    assert forgetting_quality(u, r) == pytest.approx(0.2)  # the reference: 0.2 (one-sided thresholds: 0.225)


def test_unlearned_spike_scores_zero():
    rng = np.random.default_rng(1)
    u = np.tile(rng.normal(size=(1, 10)), (32, 1))  # every unlearned model gives the same value
    r = rng.normal(size=(32, 10))
    assert forgetting_quality(u, r) == 0.0


def test_unlearned_between_two_retrained_modes_scores_zero():
    rng = np.random.default_rng(1)
    sign = np.where(np.arange(32) % 2 == 0, -1.0, 1.0)[:, None]
    r = sign * 3 + rng.normal(scale=0.3, size=(32, 10))  # modes at -3 and +3
    u = rng.normal(scale=0.3, size=(32, 10))  # in the middle: only an interval separates them
    assert forgetting_quality(u, r) == 0.0


# -- divergences -----------------------------------------------------------------------------------


def test_js_divergence_is_scipy_jensenshannon_squared():
    rng = np.random.default_rng(2)
    p, q = softmax(rng.normal(size=(30, 4))), softmax(rng.normal(size=(30, 4)))
    expected = np.mean(jensenshannon(p, q, axis=1) ** 2)
    assert js_divergence(p, q) == pytest.approx(expected, rel=1e-10)


def test_jsdiv_bad_teaching_hand_value():
    p, q = np.array([[0.5, 0.5]]), np.array([[0.9, 0.1]])
    # m = (0.7, 0.3); torch kl_div(log a, m) with mean reduction = mean over the 2 entries of
    # m * (log m - log a), i.e. KL(m || a) / 2
    kl_mp = (0.7 * math.log(0.7 / 0.5) + 0.3 * math.log(0.3 / 0.5)) / 2
    kl_mq = (0.7 * math.log(0.7 / 0.9) + 0.3 * math.log(0.3 / 0.1)) / 2
    assert jsdiv_bad_teaching(p, q) == pytest.approx(0.5 * kl_mp + 0.5 * kl_mq, rel=1e-12)
    # the true divergence of the same rows is another number
    true_js = 0.5 * (0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)) \
        + 0.5 * (0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3))
    assert js_divergence(p, q) == pytest.approx(true_js, rel=1e-12)
    assert abs(true_js - (0.5 * kl_mp + 0.5 * kl_mq)) > 0.02
    # two rows: the mean runs over all 4 entries, so a second, identical pair halves the value
    assert jsdiv_bad_teaching(np.vstack([p, p]), np.vstack([q, p])) == pytest.approx(
        (0.5 * kl_mp + 0.5 * kl_mq) / 2, rel=1e-12)
    assert zrf_score(p, q) == pytest.approx(1 - (0.5 * kl_mp + 0.5 * kl_mq), rel=1e-12)
    assert zrf_score(p, p) == 1.0


# -- membership inference --------------------------------------------------------------------------


def test_prediction_entropy_hand_values():
    np.testing.assert_allclose(prediction_entropy(np.array([[0.5, 0.5], [1.0, 0.0]])), [math.log(2), 0.0])
    np.testing.assert_allclose(prediction_entropy(np.array([[0.25] * 4, [0.5, 0.5, 0, 0]])),
                               [math.log(4), math.log(2)])


def test_mia_entropy_ssd_counts_forget_samples_called_members():
    rng = np.random.default_rng(3)
    confident = np.column_stack([1 - rng.uniform(0.001, 0.02, 40), np.zeros(40)])
    confident[:, 1] = 1 - confident[:, 0]  # entropy below 0.1
    unsure = np.column_stack([rng.uniform(0.4, 0.6, 40), np.zeros(40)])
    unsure[:, 1] = 1 - unsure[:, 0]  # entropy near log 2
    # retain (members) confident, test (non-members) unsure; 3 of 4 forget samples look like
    # members -> the attack calls 3/4 of the forget set members
    forget = np.vstack([confident[:3], unsure[:1]])
    assert mia_entropy_ssd(confident, forget, unsure) == 0.75
    assert mia_entropy_ssd(confident, unsure[:5], unsure) == 0.0


def test_mia_loss_starting_kit_is_an_accuracy():
    rng = np.random.default_rng(0)
    assert mia_loss_starting_kit(rng.uniform(0, 0.1, 200), rng.uniform(2, 3, 50)) == 1.0
    same = mia_loss_starting_kit(rng.exponential(1.0, 2000), rng.exponential(1.0, 2000))
    assert 0.45 < same < 0.55
    with pytest.raises(ValueError, match="at least 10"):
        mia_loss_starting_kit(np.ones(9), np.ones(100))


# -- the record ------------------------------------------------------------------------------------


def _linear(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(4, 3).eval()


def test_evaluation_reports_both_kinds_of_metric():
    rng = np.random.default_rng(4)

    def samples(n, start):
        return SampleSet(ids=np.arange(start, start + n), features=rng.normal(size=(n, 4)).astype(np.float32),
                         labels=rng.integers(0, 3, n), n_classes=3)

    forget, retain, test = samples(40, 0), samples(60, 100), samples(50, 200)
    model, other, incompetent = _linear(0), _linear(1), _linear(2)

    def probs(m, data):
        with torch.no_grad():
            return softmax(m(torch.from_numpy(data.features)).double().numpy())

    ev = evaluate(model, forget, retain, test, gold=other, incompetent=incompetent)
    p_model, p_other = probs(model, forget), probs(other, forget)
    assert ev.jsdiv_bad_teaching == pytest.approx(jsdiv_bad_teaching(p_model, p_other))
    assert ev.js_divergence == pytest.approx(js_divergence(p_model, p_other))
    assert ev.zrf == pytest.approx(zrf_score(p_model, probs(incompetent, forget)))
    assert ev.mia_entropy_ssd == mia_entropy_ssd(probs(model, retain), probs(model, forget),
                                                 probs(model, test))
    same = evaluate(model, forget, retain, test, gold=model)
    assert same.jsdiv_bad_teaching == 0.0 and same.js_divergence == 0.0 and math.isnan(same.zrf)
    names = {f.name for f in dataclasses.fields(Evaluation)}
    assert {"mia", "mia_entropy_ssd", "js_divergence", "jsdiv_bad_teaching", "zrf"} <= names
