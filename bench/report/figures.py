"""The run folder's figures (matplotlib, PNG): AUROC per category, accuracy against latency,
and an anomaly-map gallery per category.

Every figure is drawn from result rows and the saved examples alone. A figure whose data
the run lacks (no latency measured, no maps saved) is skipped with a note saying why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bench.report.columns import column_labels, with_columns  # noqa: E402
from bench.report.figure_record import FOLDER, Figure  # noqa: E402
from bench.runner import examples  # noqa: E402

DPI = 100
PNG_COMPRESSION = 1  # zlib level: a few percent larger files, several times faster to write
MAP_CMAP = "inferno"
MASK_COLOUR = "cyan"
MAX_LABELLED_BARS = 60
STYLE = {  # a light grid and small type, for figures pasted beside tables
    "axes.grid": True,
    "grid.color": "#dddddd",
    "axes.axisbelow": True,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "font.size": 8,
    "axes.titlesize": 9,
    "legend.fontsize": 8,
}
MARKERS = "osD^vP*Xh"


def series_labels(frame: pd.DataFrame) -> pd.Series:
    """A table column's name (``bench.report.columns``), plus the dataset when the run has
    several."""
    label = column_labels(frame)
    if "dataset" in frame and frame["dataset"].nunique() > 1:
        label = label + " / " + frame["dataset"].astype(str)
    return label


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, pil_kwargs={"compress_level": PNG_COMPRESSION})
    plt.close(fig)
    return path


def auroc_bars(frame: pd.DataFrame, folder: Path) -> Figure:
    """Per-category image and pixel AUROC, one bar per method (mean and sd over seeds)."""
    title = "AUROC per category"
    metrics = [m for m in ("image_auroc", "pixel_auroc") if m in frame and frame[m].notna().any()]
    if not metrics:
        return Figure(title, None, "skipped: no AUROC in the result rows")
    long = frame.melt(
        id_vars=["category", "series", "seed"],
        value_vars=metrics,
        var_name="metric",
        value_name="AUROC (%)",
    ).dropna(subset=["AUROC (%)"])
    long["AUROC (%)"] = 100 * long["AUROC (%)"].astype(float)
    means = long.groupby(["series", "seed", "metric"], as_index=False)["AUROC (%)"].mean()
    long = pd.concat([long, means.assign(category="mean")], ignore_index=True)
    long["metric"] = long["metric"].map({"image_auroc": "image", "pixel_auroc": "pixel"})
    categories = list(dict.fromkeys(frame["category"])) + ["mean"]
    series = list(dict.fromkeys(long["series"]))
    several_seeds = frame["seed"].nunique() > 1
    width = max(6.0, 0.35 * len(categories) * max(1, len(series)) + 2)
    panels = [m for m in ("image", "pixel") if (long["metric"] == m).any()]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(width, 2.8 * len(panels) + 0.4), squeeze=False
    )
    # Bars start at chance level (50) unless some value is below it.
    bottom = 50 if long["AUROC (%)"].min() >= 50 else 0
    step = 0.8 / len(series)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes[:, 0], panels, strict=True):
        part = long[long["metric"] == panel]
        for k, name in enumerate(series):
            values = part[part["series"] == name].groupby("category")["AUROC (%)"]
            mean, sd = values.mean(), values.std(ddof=1)
            x = [i - 0.4 + step * (k + 0.5) for i, c in enumerate(categories) if c in mean]
            heights = [mean[c] for c in categories if c in mean]
            errors = [sd.get(c) for c in categories if c in mean] if several_seeds else None
            bars = ax.bar(x, heights, step, yerr=errors, label=name,
                          color=colours[k % len(colours)], capsize=2)  # fmt: skip
            if len(series) * len(categories) <= MAX_LABELLED_BARS:
                ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=1)
        ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
        ax.set_ylim(bottom, 101)
        ax.set_ylabel("AUROC (%)")
        ax.set_title(f"{panel} AUROC")
    axes[0, 0].legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    seeds = "mean ± sd over seeds" if several_seeds else "one seed"
    fig.suptitle(f"AUROC per category ({seeds})")
    fig.tight_layout()
    return Figure(title, _save(fig, folder / FOLDER / "auroc_by_category.png"))


def accuracy_latency(frame: pd.DataFrame, folder: Path) -> Figure:
    """One point per method x backbone: mean image AUROC against end-to-end latency."""
    title = "Image AUROC against latency"
    if "latency_e2e_ms" not in frame or frame["latency_e2e_ms"].isna().all():
        return Figure(
            title,
            None,
            "skipped: the result rows have no latency_e2e_ms (these cells were not profiled)",
        )
    frame, keys = with_columns(frame)
    keys = keys if "backbone" in keys else [keys[0], "backbone", *keys[1:]]
    points = (
        frame.dropna(subset=["latency_e2e_ms", "image_auroc"])
        .groupby(keys, as_index=False)
        .agg(latency=("latency_e2e_ms", "mean"), auroc=("image_auroc", "mean"))
    )
    points["auroc"] *= 100
    labels = [k for k in keys if k != "backbone"]
    points["method"] = points[labels].astype(str).agg(" / ".join, axis=1)
    order = list(dict.fromkeys(frame[labels].astype(str).agg(" / ".join, axis=1)))
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    backbones = list(dict.fromkeys(points["backbone"]))
    for k, name in enumerate(order):
        for b, backbone in enumerate(backbones):
            here = points[(points["method"] == name) & (points["backbone"] == backbone)]
            if not here.empty:
                label = name if len(backbones) == 1 else f"{name}, {backbone}"
                ax.scatter(here["latency"], here["auroc"], s=90, label=label,
                           color=colours[k % len(colours)], marker=MARKERS[b % len(MARKERS)])  # fmt: skip
    if points["latency"].max() > 20 * points["latency"].min():
        ax.set_xscale("log")
    ax.set_xlabel("end-to-end latency per image, batch 1 (ms, median)")
    ax.set_ylabel("image AUROC (%), mean over categories")
    ax.set_title("Accuracy against latency (one point per method x backbone)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, frameon=False)
    fig.tight_layout()
    return Figure(title, _save(fig, folder / FOLDER / "accuracy_vs_latency.png"))


def epoch_curves(frame: pd.DataFrame, folder: Path) -> Figure | None:
    """Image and pixel AUROC against epoch, one line per method (mean over categories and
    seeds), for runs evaluated during training (--eval-every); None for other runs."""
    long = epoch_frame(frame)
    if long.empty:
        return None
    title = "AUROC against epoch (evaluated during training)"
    metrics = [m for m in ("image_auroc", "pixel_auroc") if long[m].notna().any()]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.0 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        data = long.assign(value=100 * long[metric].astype(float))
        for name, part in data.groupby("series", sort=False):
            curve = part.groupby("epoch")["value"].mean()
            ax.plot(curve.index, curve.values, marker="o", label=str(name))
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{metric.replace('_', ' ')} (%)")
        ax.set_title(f"{metric.split('_')[0]} AUROC, mean over categories")
        ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return Figure(title, _save(fig, folder / FOLDER / "auroc_by_epoch.png"))


def epoch_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (cell, evaluated epoch) of the rows that have a history."""
    if "history" not in frame:
        return pd.DataFrame()
    records = []
    for _, row in frame[frame["history"].notna()].iterrows():
        for entry in row["history"]:
            records.append({"series": row["series"], "category": row["category"], **entry})
    return pd.DataFrame(records)


def _gallery_columns(part: pd.DataFrame, folder: Path) -> list[tuple[str, dict]]:
    """(series label, examples) per series of one category: the lowest seed's cell."""
    columns = []
    for label, cells in part.sort_values("seed").groupby("series", sort=False):
        for key in cells["cell_key"]:
            found = examples.load(folder, key)
            if found is not None and len(found["names"]):
                columns.append((str(label), found))
                break
    return columns


def gallery(frame: pd.DataFrame, folder: Path, category: str) -> Figure:
    """Image, ground truth and each method's map for the saved test images of a category."""
    title = f"Anomaly maps, {category}"
    columns = _gallery_columns(frame[frame["category"] == category], folder)
    if not columns:
        return Figure(title, None, "skipped: no anomaly maps saved for this category")
    # The image column shows the widest view (a method that centre-crops sees less).
    first = max((found for _, found in columns), key=lambda f: float(f.get("field", 1.0)))
    names = [str(n) for n in first["names"]]
    n_rows, n_cols = len(names), 2 + len(columns)
    height = 1.7 * n_rows + 1.6
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.7 * n_cols, height), squeeze=False)
    # A fixed layout: the constrained solver drew the figure twice and cost more than the rest.
    fig.subplots_adjust(
        left=0.1, right=0.98, top=1 - 0.75 / height, bottom=0.6 / height, wspace=0.05, hspace=0.05
    )
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for r, name in enumerate(names):
        axes[r, 0].imshow(first["images"][r])
        axes[r, 0].set_ylabel(name, fontsize=7)
        axes[r, 1].imshow(first["masks"][r], cmap="gray", vmin=0, vmax=1)
    axes[0, 0].set_title("image", fontsize=8)
    axes[0, 1].set_title("ground truth", fontsize=8)
    for c, (label, found) in enumerate(columns, start=2):
        index = {str(n): i for i, n in enumerate(found["names"])}
        maps = found["maps"].astype(np.float32)
        low, high = float(maps.min()), float(maps.max())
        image = None
        for r, name in enumerate(names):
            if name not in index:
                axes[r, c].set_axis_off()
                continue
            i = index[name]
            image = axes[r, c].imshow(maps[i], cmap=MAP_CMAP, vmin=low, vmax=high)
            if found["masks"][i].any():
                axes[r, c].contour(
                    found["masks"][i], levels=[0.5], colors=MASK_COLOUR, linewidths=0.7
                )
        axes[0, c].set_title(label, fontsize=8)
        if image is not None:
            # Under the column, outside the grid, so every row keeps the same size.
            below = axes[-1, c].inset_axes((0.05, -0.16, 0.9, 0.07))
            bar = fig.colorbar(image, cax=below, orientation="horizontal")
            bar.ax.tick_params(labelsize=6)
            bar.ax.xaxis.get_major_locator().set_params(nbins=3)
    fig.suptitle(
        f"{category}: anomaly maps\n(raw scores, one colour scale per method column;\n"
        f"{MASK_COLOUR} line: ground truth)",
        fontsize=8,
    )
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in category)
    return Figure(title, _save(fig, folder / FOLDER / f"gallery_{safe}.png"))


def write_figures(folder: Path, rows: list[dict[str, Any]]) -> list[Figure]:
    """Every figure of a run folder, rebuilt from its result rows and saved examples."""
    if not rows:  # every cell failed: a report still says what there is to see
        return [Figure("Figures", None, "skipped: no cell of this run finished")]
    frame = pd.DataFrame(rows)
    frame["series"] = series_labels(frame)
    with plt.rc_context(STYLE):
        figures = [auroc_bars(frame, folder), accuracy_latency(frame, folder)]
        curves = epoch_curves(frame, folder)
        figures += [curves] if curves is not None else []
    with plt.rc_context({**STYLE, "axes.grid": False}):
        galleries = [gallery(frame, folder, c) for c in dict.fromkeys(frame["category"])]
    if all(g.path is None for g in galleries):
        note = "skipped: no cell saved anomaly maps (a dataset without masks, or an older run)"
        return [*figures, Figure("Anomaly maps", None, note)]
    return figures + galleries
