"""Tables from result rows: category x method, a mean row, mean +- std over seeds.

Values are printed in percent, as the papers print them. A metric a dataset cannot have
(pixel metrics on CIFAR-10) is shown as a dash, never as zero.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from bench.errors import BenchError
from bench.metrics import METRIC_LABELS
from bench.report.columns import with_columns
from bench.report.statistics import over_seeds
from bench.runner.row import columns

TABLE_METRICS = ("image_auroc", "pixel_auroc", "aupro")
"""The tables a run prints unless --metrics names others."""
MISSING = "–"


def results_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows as a DataFrame with the result row's columns in their order; columns a plugin
    adds (extra outputs of a method) follow them."""
    frame = pd.DataFrame(rows)
    known = columns()
    ordered = [c for c in known if c in frame] + [c for c in frame if c not in known]
    frame = frame[ordered]
    if "settings" in frame:
        frame["settings"] = frame["settings"].map(lambda s: json.dumps(s, sort_keys=True))
    if "history" in frame:
        frame["history"] = frame["history"].map(lambda h: None if h is None else json.dumps(h))
    return frame


def _column_name(key: Any) -> str:
    return key if isinstance(key, str) else " / ".join(str(k) for k in key if k != "")


def _fmt(values: pd.Series, bounds: tuple[pd.Series, pd.Series] | None = None) -> str:
    """Mean (± std over seeds). With ``bounds``: one seed shows its bootstrap interval over
    test images, several seeds the 95% t-interval of their mean."""
    values = values.dropna()
    if values.empty:
        return MISSING
    mean = 100 * values.mean()
    if len(values) < 2:
        low, high = (None, None) if bounds is None else (b.dropna() for b in bounds)
        if low is not None and len(low) and len(high):
            return f"{mean:.1f} [{100 * low.iloc[0]:.1f}, {100 * high.iloc[0]:.1f}]"
        return f"{mean:.1f}"
    if bounds is not None:  # several seeds: the t-interval of the mean over seeds
        summary = over_seeds(values.tolist())
        return f"{mean:.1f} [{100 * summary.low:.1f}, {100 * summary.high:.1f}]"
    return f"{mean:.1f} ± {100 * values.std(ddof=1):.1f}"


def metric_table(frame: pd.DataFrame, metric: str, ci: bool = False) -> pd.DataFrame:
    """Rows: categories in run order, then 'mean'; columns: methods (split further where
    rows differ in how they were made, ``bench.report.columns``); cells: mean ± std."""
    frame, keys = with_columns(frame)
    categories = list(dict.fromkeys(frame["category"]))
    columns = list(dict.fromkeys(map(tuple, frame[keys].values.tolist())))
    table: dict[str, dict[str, str]] = {}
    for column in columns:
        name = _column_name(column if len(column) > 1 else column[0])
        part = frame[(frame[keys].apply(tuple, axis=1)) == column]
        cells = {}
        for category in categories:
            here = part.loc[part["category"] == category]
            bounds = None
            if ci and f"{metric}_lo" in here:
                bounds = (here[f"{metric}_lo"].astype(float), here[f"{metric}_hi"].astype(float))
            cells[category] = _fmt(here[metric].astype(float), bounds)
        per_seed = part.groupby("seed")[metric].apply(lambda s: s.astype(float).mean())
        cells["mean"] = _fmt(per_seed) if part[metric].notna().any() else MISSING
        covered = part.loc[part[metric].notna(), "category"].nunique()
        if 0 < covered < len(categories):  # a mean over fewer categories than the others'
            cells["mean"] += f" ({covered} of {len(categories)} categories)"
        table[name] = cells
    result = pd.DataFrame(table)
    result.index.name = "category"
    return result


def caption(frame: pd.DataFrame, metric: str) -> str:
    seeds = sorted(frame["seed"].unique().tolist())
    weights = ", ".join(sorted(frame["weights"].unique()))
    refs = ", ".join(sorted(frame["reference"].unique()))
    text = (
        f"{METRIC_LABELS[metric]} (%) on {', '.join(sorted(frame['dataset'].unique()))}; "
        f"reference {refs}; weights {weights}; "
        f"{'mean ± std over seeds ' if len(seeds) > 1 else 'seed '}{', '.join(map(str, seeds))}."
    )
    if "setting" in frame and (frame["setting"] == "unified").any():
        trained = ", ".join(sorted(frame["trained_on"].dropna().unique()))
        text += f" Unified rows: one model per method, trained on {trained} together."
    if not frame["pretrained"].all():
        text += " Backbone NOT ImageNet-pretrained: not comparable with published numbers."
    return text


def to_markdown(table: pd.DataFrame, title: str) -> str:
    header = "| " + " | ".join([table.index.name, *table.columns]) + " |"
    rule = "|" + "---|" * (len(table.columns) + 1)
    lines = [f"**{title}**", "", header, rule]
    for index, row in table.iterrows():
        label = f"**{index}**" if index == "mean" else str(index)
        lines.append("| " + " | ".join([label, *row.tolist()]) + " |")
    return "\n".join(lines) + "\n"


def _tex(text: str) -> str:
    return (
        text.replace("\\", r"\textbackslash{}")
        .replace("_", r"\_")
        .replace("%", r"\%")
        .replace("±", r"$\pm$")
    )


def to_latex(table: pd.DataFrame, title: str) -> str:
    spec = "l" + "c" * len(table.columns)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{_tex(title)}}}",
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(_tex(c) for c in [table.index.name, *table.columns]) + r" \\",
        r"\midrule",
    ]
    for index, row in table.iterrows():
        if index == "mean":
            lines.append(r"\midrule")
        lines.append(" & ".join(_tex(str(c)) for c in [index, *row.tolist()]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def numeric_table(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean and std per category and column, as numbers in [0, 1], for CSV export; the
    weights are always a column, since a CSV has no caption to name them."""
    frame, keys = with_columns(frame)
    keys += [] if "weights" in keys else ["weights"]
    grouped = frame.groupby(["category", *keys])[metric]
    out = grouped.agg(["mean", "std", "count"]).reset_index()
    out.insert(0, "metric", metric)
    return out


def check_metrics(names: list[str]) -> None:
    unknown = [name for name in names if name not in METRIC_LABELS]
    if unknown:
        raise BenchError(
            f"--metrics {','.join(unknown)}: unknown; known: {', '.join(METRIC_LABELS)}"
        )


def write_tables(
    frame: pd.DataFrame,
    folder: Path,
    metrics: Sequence[str] = TABLE_METRICS,
    ci: bool = False,
) -> str:
    """Write results.csv, tables.md, tables.tex and tables.csv; return the markdown.

    ``metrics`` chooses the tables; ``ci`` adds each single-seed cell's 95% interval."""
    check_metrics(list(metrics))
    folder.mkdir(parents=True, exist_ok=True)
    frame.to_csv(folder / "results.csv", index=False)
    markdown, latex, numeric, empty = [], [], [], []
    for metric in metrics:
        if metric not in frame:
            continue
        if frame[metric].isna().all():
            empty.append(METRIC_LABELS[metric])
            continue
        table = metric_table(frame, metric, ci)
        title = caption(frame, metric)
        markdown.append(to_markdown(table, title))
        latex.append(to_latex(table, title))
        numeric.append(numeric_table(frame, metric))
    if empty:
        markdown.append(
            f"Not shown, no cell has a value: {', '.join(empty)} (pixel metrics need "
            "ground-truth masks, which this dataset does not have).\n"
        )
    text = "\n".join(markdown)
    (folder / "tables.md").write_text(text)
    (folder / "tables.tex").write_text("\n".join(latex))
    if numeric:
        pd.concat(numeric).to_csv(folder / "tables.csv", index=False)
    return text


BEST_EPOCH_CAPTION = (
    "Best epoch on test: optimistic, as in the paper's code. Each cell is the highest value "
    "over the epochs evaluated with --eval-every, picked on the test set itself (mean over "
    "seeds of each seed's best; the epoch in brackets when one seed). The tables above show "
    "the last epoch, the number to report."
)


def best_epoch_table(rows: list[dict[str, Any]], metric: str) -> pd.DataFrame | None:
    """Category x method of the best value of ``metric`` over each cell's evaluated epochs;
    None when no row was evaluated during training."""
    picked = []
    for row in rows:
        history = [h for h in row.get("history") or [] if h.get(metric) is not None]
        if history:
            best = max(history, key=lambda h: h[metric])
            picked.append({**row, metric: best[metric], "best_epoch": best["epoch"]})
    if not picked:
        return None
    frame = pd.DataFrame(picked)
    table = metric_table(frame, metric)
    if frame["seed"].nunique() == 1:
        frame, keys = with_columns(frame)
        for _, row in frame.iterrows():
            name = _column_name(tuple(row[keys]) if len(keys) > 1 else row[keys[0]])
            table.loc[row["category"], name] += f" (ep {row['best_epoch']})"
    return table
