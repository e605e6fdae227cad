"""Comparing methods: paired bootstraps, tests over categories, ranks, summaries over seeds.

* One category, two methods on the same test images: ``paired_bootstrap`` resamples the images
  once and evaluates both methods on the same draws, so what the two share (hard images, easy
  images) cancels out of their difference.
* Many categories: ``sign_test`` and ``wilcoxon_test`` on the per-category metric pairs;
  ``rank_methods`` gives the mean rank of each of several methods, the Friedman test and the
  Nemenyi critical difference, and ``critical_difference_diagram`` draws them.
* Several seeds of one cell: ``over_seeds``, the mean with a Student-t interval.

Metrics are "higher is better" throughout, like every metric in ``bench.metrics``.

scipy and matplotlib are imported by the functions that use them, so a report that needs
no test starts without them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.metrics import (
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    Evidence,
    bootstrap_weights,
    percentile_interval,
    resampled_values,
)

# --------------------------------------------------------------------------- two methods


@dataclass(frozen=True)
class PairedDifference:
    """Metric of A minus metric of B on one test set, with its bootstrap interval and p-value."""

    difference: float
    low: float | None
    high: float | None
    p_value: float | None
    n_resamples: int


def paired_bootstrap(
    a: Evidence,
    b: Evidence,
    metric: str,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
) -> PairedDifference | None:
    """A minus B, both resampled with the same draws of the test images (stratified).

    The p-value is two-sided: twice the smaller share of resampled differences on either side
    of zero, each count plus one over resamples plus one (so never 0), capped at 1; it is below
    1 - level exactly when the percentile interval excludes 0, up to that +1. None when the
    metric is absent for either method.
    """
    if not np.array_equal(a.labels, b.labels):
        raise ValueError("paired_bootstrap needs both methods evaluated on the same test images")
    value_a, value_b = a.values.get(metric), b.values.get(metric)
    if value_a is None or value_b is None:
        return None
    weights = bootstrap_weights(a.labels, n_resamples, seed)
    differences = resampled_values(a, metric, weights) - resampled_values(b, metric, weights)
    interval = percentile_interval(differences, level)
    finite = differences[np.isfinite(differences)]
    p_value = None
    if finite.size:
        smaller_side = min(np.count_nonzero(finite <= 0), np.count_nonzero(finite >= 0))
        p_value = min(1.0, 2.0 * (smaller_side + 1) / (finite.size + 1))
    low, high = interval if interval is not None else (None, None)
    return PairedDifference(value_a - value_b, low, high, p_value, n_resamples)


# --------------------------------------------------------------------------- over categories


@dataclass(frozen=True)
class TestResult:
    """A test's statistic, its two-sided p-value, and how many pairs (or blocks) it used."""

    statistic: float
    p_value: float
    n: int


def _pairs(a: Sequence[float | None], b: Sequence[float | None]) -> np.ndarray:
    """A - B per category, dropping categories where either is missing."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} values for A but {len(b)} for B: pair them by category")
    x = np.array([np.nan if v is None else v for v in a], dtype=np.float64)
    y = np.array([np.nan if v is None else v for v in b], dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep] - y[keep]


def sign_test(a: Sequence[float | None], b: Sequence[float | None]) -> TestResult | None:
    """How many categories A wins, against a fair coin (ties dropped); None without a winner.

    The statistic is A's wins; n the categories that have one.
    """
    from scipy import stats

    differences = _pairs(a, b)
    differences = differences[differences != 0]
    if differences.size == 0:
        return None
    wins = int(np.count_nonzero(differences > 0))
    p_value = float(stats.binomtest(wins, differences.size).pvalue)
    return TestResult(float(wins), p_value, int(differences.size))


def wilcoxon_test(a: Sequence[float | None], b: Sequence[float | None]) -> TestResult | None:
    """Wilcoxon signed-rank test of A - B over categories (zero differences dropped, scipy's
    default; exact p-value for small samples without ties). None without a nonzero difference."""
    from scipy import stats

    differences = _pairs(a, b)
    differences = differences[differences != 0]
    if differences.size == 0:
        return None
    result = stats.wilcoxon(differences)
    return TestResult(float(result.statistic), float(result.pvalue), int(differences.size))


# --------------------------------------------------------------------------- ranks


@dataclass(frozen=True)
class Ranks:
    """Mean rank of each method over the categories (1 = best), the Friedman test (None with
    fewer than three methods or two categories) and the Nemenyi critical difference."""

    methods: tuple[str, ...]
    mean_ranks: tuple[float, ...]
    n_categories: int
    friedman: TestResult | None
    critical_difference: float
    alpha: float


def nemenyi_critical_difference(n_methods: int, n_categories: int, alpha: float = 0.05) -> float:
    """Two mean ranks differ at level ``alpha`` when further apart than this.

    CD = q_alpha sqrt(k (k + 1) / (6 N)), q_alpha the studentized range quantile for k groups
    and infinite degrees of freedom divided by sqrt 2 (1.960, 2.344, 2.569 for k = 2, 3, 4).
    """
    from scipy import stats

    if n_methods < 2 or n_categories < 1:
        raise ValueError("a critical difference needs two methods and one category")
    q = stats.studentized_range.ppf(1.0 - alpha, n_methods, np.inf) / np.sqrt(2.0)
    return float(q * np.sqrt(n_methods * (n_methods + 1) / (6.0 * n_categories)))


def rank_methods(scores: Mapping[str, Sequence[float | None]], alpha: float = 0.05) -> Ranks:
    """Ranks of methods within each category (ties share their mean rank), averaged.

    ``scores[method][j]`` is the metric on category j, the same categories in the same order for
    every method. Categories where any method lacks a value are left out: the Friedman test
    needs complete blocks.
    """
    from scipy import stats

    methods = tuple(scores)
    if len(methods) < 2:
        raise ValueError("ranking needs at least two methods")
    lengths = {len(v) for v in scores.values()}
    if len(lengths) != 1:
        raise ValueError("every method needs one value per category, in the same order")
    table = np.array(
        [[np.nan if v is None else v for v in scores[m]] for m in methods], dtype=np.float64
    ).T
    table = table[np.isfinite(table).all(axis=1)]
    n_categories = len(table)
    if n_categories == 0:
        raise ValueError("no category has a value for every method")
    ranks = stats.rankdata(-table, axis=1)
    friedman = None
    if len(methods) >= 3 and n_categories >= 2:
        result = stats.friedmanchisquare(*table.T)
        friedman = TestResult(float(result.statistic), float(result.pvalue), n_categories)
    return Ranks(
        methods,
        tuple(float(r) for r in ranks.mean(axis=0)),
        n_categories,
        friedman,
        nemenyi_critical_difference(len(methods), n_categories, alpha),
        alpha,
    )


def indistinct_groups(ranks: Ranks) -> list[tuple[str, ...]]:
    """Maximal runs of methods (in rank order) whose mean ranks span less than the critical
    difference: the groups a critical-difference diagram joins with a bar."""
    order = np.argsort(ranks.mean_ranks, kind="stable")
    sorted_ranks = np.asarray(ranks.mean_ranks)[order]
    runs: list[tuple[int, int]] = []
    for start in range(len(order)):
        stop = start
        while stop + 1 < len(order) and sorted_ranks[stop + 1] - sorted_ranks[start] < (
            ranks.critical_difference
        ):
            stop += 1
        if stop > start and not (runs and runs[-1][1] >= stop):
            runs.append((start, stop))
    return [tuple(ranks.methods[i] for i in order[s : e + 1]) for s, e in runs]


def critical_difference_diagram(ranks: Ranks, path: str | Path, title: str = "") -> Path:
    """Demsar's diagram as a PNG: the axis of mean ranks (1, the best, on the left), the
    critical difference above it, each method's name on the side of its rank, and a bar under
    each group of methods that do not differ significantly."""
    from matplotlib.figure import Figure

    path = Path(path)
    k = len(ranks.methods)
    order = [int(i) for i in np.argsort(ranks.mean_ranks, kind="stable")]
    groups = indistinct_groups(ranks)
    position = {m: ranks.mean_ranks[i] for i, m in enumerate(ranks.methods)}
    left = order[: (k + 1) // 2]
    right = order[(k + 1) // 2 :][::-1]
    bar_gap, line_gap = 0.25, 0.45
    first_line = -0.3 - bar_gap * len(groups) - 0.3
    depth = first_line - line_gap * max(len(left), len(right))

    fig = Figure(figsize=(7.0, 1.6 + 0.32 * (max(len(left), len(right)) + len(groups))))
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_xlim(0.6, k + 0.4)
    ax.set_ylim(depth - 0.2, 1.6)
    ax.plot([1, k], [0, 0], color="black", lw=1)
    for tick in range(1, k + 1):
        ax.plot([tick, tick], [0, 0.12], color="black", lw=1)
        ax.text(tick, 0.2, str(tick), ha="center", va="bottom", fontsize=9)
    cd = ranks.critical_difference
    ax.plot([1, 1 + cd], [1.1, 1.1], color="black", lw=1.5)
    for end in (1, 1 + cd):
        ax.plot([end, end], [1.02, 1.18], color="black", lw=1)
    ax.text(1 + cd / 2, 1.22, f"CD = {cd:.2f}", ha="center", va="bottom", fontsize=9)
    for side, members in ((-1, left), (1, right)):
        edge = 0.75 if side < 0 else k + 0.25
        for level, index in enumerate(members):
            rank = ranks.mean_ranks[index]
            y = first_line - line_gap * level
            ax.plot([rank, rank, edge], [0, y, y], color="black", lw=0.8)
            ax.text(
                edge + 0.05 * side,
                y,
                f"{ranks.methods[index]} ({rank:.2f})",
                ha="left" if side > 0 else "right",
                va="center",
                fontsize=9,
            )
    for level, group in enumerate(groups):
        y = -0.3 - bar_gap * level
        low, high = min(position[m] for m in group), max(position[m] for m in group)
        ax.plot([low - 0.03, high + 0.03], [y, y], color="black", lw=3, solid_capstyle="butt")
    if title:
        ax.set_title(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


# --------------------------------------------------------------------------- seeds


@dataclass(frozen=True)
class SeedSummary:
    """Mean over seeds and its Student-t interval (None with a single seed)."""

    mean: float
    low: float | None
    high: float | None
    n: int


def over_seeds(values: Sequence[float | None], level: float = DEFAULT_LEVEL) -> SeedSummary | None:
    """Mean of one cell's metric over its seeds; missing values are left out (None if all)."""
    from scipy import stats

    x = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return None
    mean = float(x.mean())
    if x.size == 1:
        return SeedSummary(mean, None, None, 1)
    half = stats.t.ppf(0.5 + level / 2.0, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size)
    return SeedSummary(mean, mean - float(half), mean + float(half), int(x.size))
