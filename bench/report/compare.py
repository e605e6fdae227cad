"""``bench compare RUN --methods a,b``: which differences between two methods are real.

Per category, the paired bootstrap of the metric's difference resamples the same test
images for both methods (their cells share the images, so the draws are paired); over
categories, a sign test and a Wilcoxon signed-rank test ask whether one method wins more
often than chance. And the ranks of every method of a run (Friedman test, Nemenyi
critical difference) feed report.md's critical-difference figure.
"""

from __future__ import annotations

import statistics as stats
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.errors import BenchError
from bench.metrics import METRIC_LABELS, Evidence
from bench.report.statistics import (
    Ranks,
    critical_difference_diagram,
    paired_bootstrap,
    rank_methods,
    sign_test,
    wilcoxon_test,
)
from bench.runner.store import EVIDENCE_FOLDER, read_store

MIN_CATEGORIES_FOR_RANKS = 5
PAIR_KEYS = ("dataset", "category", "backbone", "seed", "reference")


def _evidence(folder: Path, row: dict[str, Any]) -> Evidence:
    path = folder / EVIDENCE_FOLDER / f"{row['cell_key']}.npz"
    if not path.is_file():
        raise BenchError(
            f"{path}: no evidence for {row['method']} / {row['category']}; rerun the cell "
            "with this version (bench run --force) to compare it"
        )
    return Evidence.load(path)


def compare_methods(
    folder: Path, methods: Sequence[str], metric: str = "image_auroc", n_resamples: int = 1000
) -> str:
    """A markdown table per category and the tests over categories, for two methods."""
    if len(methods) != 2:
        raise BenchError(f"--methods {','.join(methods)}: name exactly two methods")
    if metric not in METRIC_LABELS:
        raise BenchError(f"--metric {metric}: unknown; known: {', '.join(METRIC_LABELS)}")
    rows, _ = read_store(folder)
    a_name, b_name = methods
    by_key = {(r["method"], *(r[k] for k in PAIR_KEYS)): r for r in rows}
    pairs = [
        (by_key[(a_name, *key)], by_key[(b_name, *key)])
        for (method, *key) in by_key
        if method == a_name and (b_name, *key) in by_key
    ]
    if not pairs:
        found = ", ".join(sorted({r["method"] for r in rows}))
        raise BenchError(
            f"{folder}: no cells where both {a_name} and {b_name} ran (methods here: {found})"
        )
    label = METRIC_LABELS[metric]
    lines = [
        f"**{label}: {a_name} − {b_name}**, paired bootstrap over test images "
        f"({n_resamples} resamples, 95% interval)",
        "",
        f"| category | backbone | seed | {a_name} | {b_name} | Δ [95% CI] | p | real? |",
        "|---|---|---|---|---|---|---|---|",
    ]
    a_means: dict[str, list[float]] = {}
    b_means: dict[str, list[float]] = {}
    for a, b in pairs:
        diff = paired_bootstrap(_evidence(folder, a), _evidence(folder, b), metric, n_resamples)
        if a.get(metric) is None or b.get(metric) is None:
            continue
        a_means.setdefault(a["category"], []).append(a[metric])
        b_means.setdefault(a["category"], []).append(b[metric])
        interval = "" if diff.low is None else f" [{100 * diff.low:+.1f}, {100 * diff.high:+.1f}]"
        real = diff.low is not None and (diff.low > 0 or diff.high < 0)
        p = "–" if diff.p_value is None else f"{diff.p_value:.3f}"
        lines.append(
            f"| {a['category']} | {a['backbone']} | {a['seed']} | {100 * a[metric]:.1f} "
            f"| {100 * b[metric]:.1f} | {100 * diff.difference:+.1f}{interval} | {p} "
            f"| {'yes' if real else 'no'} |"
        )
    categories = sorted(a_means)
    a_per = [stats.fmean(a_means[c]) for c in categories]
    b_per = [stats.fmean(b_means[c]) for c in categories]
    lines += ["", f"Over {len(categories)} categories (mean over seeds per category):"]
    for name, test in (("sign test", sign_test), ("Wilcoxon signed-rank", wilcoxon_test)):
        result = test(a_per, b_per)
        lines.append(
            f"- {name}: "
            + ("not enough categories" if result is None else f"p = {result.p_value:.3f}")
        )
    lines.append(
        "A difference is called real when its interval excludes 0 (per category) or p < 0.05 "
        "(over categories); intervals are over test images only, not over training seeds."
    )
    return "\n".join(lines) + "\n"


def method_ranks(rows: list[dict[str, Any]], metric: str = "image_auroc") -> Ranks | None:
    """Mean rank per method (series) over the categories every method has; None for runs
    with fewer than five such categories."""
    per: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        if row.get(metric) is not None:
            series = (
                row["method"]
                if row.get("backbone") is None
                else f"{row['method']} / {row['backbone']}"
            )
            per.setdefault(series, {}).setdefault(row["category"], []).append(row[metric])
    if len(per) < 2:
        return None
    shared = sorted(set.intersection(*(set(c) for c in per.values())))
    if len(shared) < MIN_CATEGORIES_FOR_RANKS:
        return None
    return rank_methods({m: [stats.fmean(c[k]) for k in shared] for m, c in per.items()})


def ranks_figure(
    rows: list[dict[str, Any]], path: Path, metric: str = "image_auroc"
) -> Ranks | None:
    """The critical-difference diagram of a run, or None when it has too few categories."""
    ranks = method_ranks(rows, metric)
    if ranks is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        critical_difference_diagram(ranks, path, f"{METRIC_LABELS[metric]}: mean rank")
    return ranks
