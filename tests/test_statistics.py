"""Comparisons of methods against hand computations and scipy."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from bench.datasets.pipeline import GroundTruth
from bench.metrics import bootstrap_weights, evaluate_with_evidence, resampled_values
from bench.report.statistics import (
    Ranks,
    critical_difference_diagram,
    indistinct_groups,
    nemenyi_critical_difference,
    over_seeds,
    paired_bootstrap,
    rank_methods,
    sign_test,
    wilcoxon_test,
)


def _evidence(labels, scores):
    return evaluate_with_evidence(GroundTruth(labels, None, None), scores, None)[1]


# --------------------------------------------------------------------------- two methods


def test_paired_bootstrap_shares_the_draws():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(40, int), np.ones(30, int)]
    a = _evidence(labels, rng.standard_normal(70) + 1.2 * labels)
    b = _evidence(labels, rng.standard_normal(70) + 0.3 * labels)
    result = paired_bootstrap(a, b, "image_auroc", n_resamples=400, seed=3)
    assert result.difference == a.values["image_auroc"] - b.values["image_auroc"]
    weights = bootstrap_weights(labels, 400, seed=3)
    differences = resampled_values(a, "image_auroc", weights) - resampled_values(
        b, "image_auroc", weights
    )
    assert (result.low, result.high) == pytest.approx(np.percentile(differences, [2.5, 97.5]))
    assert 0 < result.low < result.high
    # two-sided: twice the smaller tail, each count plus one over 400 + 1
    below = np.count_nonzero(differences <= 0)
    assert below < 10 and result.p_value == pytest.approx(2 * (below + 1) / 401)
    # B no better than chance: every resampled difference is positive, the smallest p-value
    chance = _evidence(labels, rng.standard_normal(70))
    far = paired_bootstrap(a, chance, "image_auroc", n_resamples=400, seed=3)
    assert far.p_value == pytest.approx(2 / 401)


def test_paired_bootstrap_same_method_and_misuse():
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(20, int), np.ones(20, int)]
    scores = rng.standard_normal(40) + labels
    a = _evidence(labels, scores)
    same = paired_bootstrap(a, _evidence(labels, scores.copy()), "image_ap", n_resamples=200)
    assert (same.difference, same.low, same.high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    # pairing removes what both share: B = A plus a little noise gives a narrow interval
    close = _evidence(labels, scores + 0.05 * rng.standard_normal(40))
    paired = paired_bootstrap(a, close, "image_auroc", n_resamples=300)
    assert paired.high - paired.low < 0.05
    assert paired_bootstrap(a, a, "pixel_auroc") is None  # absent without masks
    with pytest.raises(ValueError, match="same test images"):
        paired_bootstrap(a, _evidence(labels[::-1], scores), "image_auroc")


# --------------------------------------------------------------------------- over categories


def test_sign_test_hand_computed():
    # A wins 4 of 5 decided categories (one tie dropped, one category missing for B):
    # P(X <= 1) + P(X >= 4) for X ~ Binomial(5, 1/2) = 2 * (1 + 5) / 32 = 0.375.
    a = [0.9, 0.8, 0.7, 0.95, 0.6, 0.5, 0.7]
    b = [0.8, 0.7, 0.6, 0.90, 0.7, 0.5, None]
    result = sign_test(a, b)
    assert (result.statistic, result.n) == (4.0, 5)
    assert result.p_value == pytest.approx(0.375, abs=1e-12)
    assert sign_test([0.5, 0.6], [0.5, 0.6]) is None
    with pytest.raises(ValueError, match="pair them"):
        sign_test([0.1], [0.1, 0.2])


def test_wilcoxon_hand_computed_and_scipy():
    # Differences 0.1, -0.2, 0.3, 0.4, 0.5: ranks 1..5, the negative one has rank 2, so
    # W = min(W+, W-) = 2; the exact two-sided p-value counts the 32 sign patterns with a
    # rank sum <= 2 (sums 0, 1, 2: three patterns) on both sides: 6 / 32 = 0.1875.
    a = [0.6, 0.5, 0.9, 1.0, 1.2]
    b = [0.5, 0.7, 0.6, 0.6, 0.7]
    result = wilcoxon_test(a, b)
    assert result.statistic == 2.0 and result.n == 5
    assert result.p_value == pytest.approx(0.1875, abs=1e-12)
    rng = np.random.default_rng(2)
    x, y = rng.random(15), rng.random(15)
    assert wilcoxon_test(x, y).p_value == pytest.approx(stats.wilcoxon(x, y).pvalue)


# --------------------------------------------------------------------------- ranks


def test_ranks_friedman_and_critical_difference():
    # 4 categories x 3 methods; per-category ranks (1 = best; a tie shares 1.5):
    #   c1: A 1, B 2, C 3   c2: A 1, B 3, C 2   c3: A 1.5, B 1.5, C 3   c4: A 1, B 2, C 3
    # mean ranks A 1.125, B 2.125, C 2.75. Friedman without tie correction:
    #   12 N / (k (k + 1)) * (sum R_j^2 - k (k + 1)^2 / 4) with R_j the mean ranks = 5.375;
    # scipy divides by the tie correction 1 - sum(t^3 - t) / (N (k^3 - k)) = 1 - 6 / 96.
    scores = {
        "A": [0.9, 0.8, 0.7, 0.95],
        "B": [0.8, 0.6, 0.7, 0.90],
        "C": [0.7, 0.7, 0.6, 0.85],
    }
    ranks = rank_methods(scores)
    assert ranks.mean_ranks == (1.125, 2.125, 2.75)
    plain = 12 * 4 / (3 * 4) * (1.125**2 + 2.125**2 + 2.75**2 - 3 * 16 / 4)
    assert plain == pytest.approx(5.375)
    assert ranks.friedman.statistic == pytest.approx(plain / (1 - 6 / 96))
    assert ranks.friedman.p_value == pytest.approx(stats.friedmanchisquare(*scores.values()).pvalue)
    # q_0.05 = 2.343 for k = 3 (Demsar's table): CD = 2.343 sqrt(3 * 4 / (6 * 4)) = 1.657
    assert ranks.critical_difference == pytest.approx(2.3437 * np.sqrt(0.5), abs=1e-3)
    assert indistinct_groups(ranks) == [("A", "B", "C")]  # 2.75 - 1.125 < 1.657
    # groups are maximal runs in rank order: a-b-c span 1.6 < 1.7; b-c lies inside; c-d 1.3
    spread = Ranks(("d", "a", "c", "b"), (3.9, 1.0, 2.6, 2.0), 10, None, 1.7, 0.05)
    assert indistinct_groups(spread) == [("a", "b", "c"), ("c", "d")]
    # a category some method lacks is left out of every method's ranks
    gappy = rank_methods({**scores, "C": [*scores["C"][:3], None]})
    assert gappy.n_categories == 3


@pytest.mark.parametrize(("k", "q"), [(2, 1.960), (4, 2.569), (6, 2.850), (10, 3.164)])
def test_nemenyi_q_matches_demsar_table(k, q):
    n = 15
    assert nemenyi_critical_difference(k, n) == pytest.approx(
        q * np.sqrt(k * (k + 1) / (6 * n)), abs=1e-3
    )


def test_critical_difference_diagram_png(tmp_path):
    rng = np.random.default_rng(3)
    base = rng.random(12)
    scores = {f"method-{i}": list(base + 0.05 * i + 0.04 * rng.random(12)) for i in range(5)}
    ranks = rank_methods(scores)
    assert ranks.mean_ranks[-1] < ranks.mean_ranks[0]  # the largest offset ranks best
    path = critical_difference_diagram(ranks, tmp_path / "figs" / "cd.png", title="AUROC")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 400 and image.height > 100


# --------------------------------------------------------------------------- seeds


def test_over_seeds_t_interval():
    # mean 0.9, sd 0.1, n 3: half-width t(0.975, 2) * 0.1 / sqrt 3 = 4.302653 * 0.057735
    summary = over_seeds([0.8, 0.9, 1.0, None])
    assert summary.n == 3 and summary.mean == pytest.approx(0.9)
    assert summary.high - summary.mean == pytest.approx(4.302653 * 0.1 / np.sqrt(3), abs=1e-6)
    expected = stats.t.interval(0.95, 2, loc=0.9, scale=0.1 / np.sqrt(3))
    assert (summary.low, summary.high) == pytest.approx(expected)
    single = over_seeds([0.7])
    assert (single.mean, single.low, single.high, single.n) == (0.7, None, None, 1)
    assert over_seeds([None]) is None
