"""The result row: every column of ``results.csv`` named once, in the order it is written.

A cell produces one ``ResultRow``; the store keeps it as JSON and every reader (tables,
figures, paper tables, the check) sees the same columns. Metric columns are not listed
here: they come from the metric declarations in ``bench.metrics``, so a new metric is one
declaration there and appears in every row, table and baseline. Cost columns are
documented in docs/profiling.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from bench.metrics import INTERVAL_COLUMNS, METRIC_LABELS


@dataclass
class ResultRow:
    """One finished cell. ``None`` means the cell could not have the figure (no profile, no
    training, no masks), never zero."""

    # what ran
    dataset: str
    category: str
    method: str
    base_method: str
    backbone: str
    seed: int
    reference: str
    weights: str  # the weights as loaded, e.g. a timm tag or "random(seed=0)"
    weights_id: str  # the tag, or the checkpoint's sha256 prefix
    pretrained: bool
    input: str  # the image pipeline, e.g. "resize 256x256 (bilinear)"
    # accuracy: one entry per metric declared in bench.metrics, and its _lo/_hi bounds
    metrics: dict[str, float | None]
    aupro_fpr_limit: float
    # the data
    n_train: int
    n_test: int
    n_anomalous: int
    data_id: str  # the images trained and tested on: names, labels, file sizes (sha256 prefix)
    trainable_params: int
    # wall time of each phase of the cell
    feature_seconds: float
    fit_seconds: float
    test_seconds: float
    metric_seconds: float
    # costs (bench.profiling)
    peak_memory_mb: float | None = None
    peak_memory_kind: str | None = None
    peak_memory_scope: str | None = None
    train_seconds_per_epoch: float | None = None
    params_head: int | None = None
    params_additional: int | None = None  # what the method's paper counts beside the backbone
    model_bytes: int | None = None  # the fitted model kept for testing (PaDiM: its Gaussians)
    params_backbone: int | None = None
    dtype: str | None = None
    flops_head: float | None = None
    flops_backbone: float | None = None
    throughput_batch: int | None = None
    profile_repeats: int | None = None
    profile_warmup: int | None = None
    latency_head_ms: float | None = None
    latency_head_ms_p95: float | None = None
    latency_e2e_ms: float | None = None
    latency_e2e_ms_p95: float | None = None
    throughput_head_ips: float | None = None
    throughput_e2e_ips: float | None = None
    profile_error: str | None = None
    # where it ran
    device: str = "cpu"
    threads: int = 1
    settings: dict[str, Any] = field(default_factory=dict)
    # "separate": a model per category; "unified": one model fitted on the training images of
    # every category in trained_on (comma-separated), its fit time the same in each row
    setting: str = "separate"
    trained_on: str | None = None
    cell_key: str = ""
    # with --eval-every: [{"epoch": k, <metric>: value, ...}, ...], the last entry the final
    # epoch (the row's own metrics); None otherwise
    history: list[dict[str, Any]] | None = None
    # the method's own outputs (Method.extra_metrics), one column each, after all others
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Flat, in column order: the metrics take their own columns."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "metrics":
                out.update({name: value.get(name) for name in metric_columns()})
            elif f.name == "extra":
                out.update(value)
            else:
                out[f.name] = value
        return out


def metric_columns() -> tuple[str, ...]:
    """Every metric column in declaration order, then each one's confidence bounds."""
    return (*METRIC_LABELS, *INTERVAL_COLUMNS)


def columns() -> list[str]:
    """Every column of a result row, in the order ``results.csv`` has them (a method's extra
    outputs follow)."""
    names: list[str] = []
    for f in dataclasses.fields(ResultRow):
        if f.name != "extra":
            names.extend(metric_columns() if f.name == "metrics" else [f.name])
    return names
