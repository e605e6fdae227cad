"""Which result rows share a table column or a figure series.

Rows are averaged together only when they were made the same way: the method, and the
backbone, reference, setting, weights and method settings wherever the rows differ in
them. So two PaDiM runs at different input sizes, or one with ImageNet weights and one
without, stay apart, each labelled by what differs.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

SPLIT_BY = ("backbone", "reference", "setting", "weights")


def _settings(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        return json.loads(value)
    return value if isinstance(value, dict) else {}


def settings_variants(frame: pd.DataFrame) -> pd.Series:
    """Per row, the method settings in which it differs from other rows of the same method,
    backbone and reference (such as "input_size=96"); empty where they all agree."""
    labels = pd.Series("", index=frame.index, dtype=object)
    if "settings" not in frame or frame.empty:
        return labels
    parsed = frame["settings"].map(_settings)
    group = [k for k in ("method", "backbone", "reference") if k in frame]
    for _, index in frame.groupby(group, sort=False).groups.items():
        here = parsed.loc[index]
        names = sorted({name for settings in here for name in settings})
        differing = [
            name
            for name in names
            if len({json.dumps(s.get(name), sort_keys=True) for s in here}) > 1
        ]
        for i in index:
            labels[i] = ", ".join(f"{name}={parsed[i].get(name)}" for name in differing)
    return labels


def with_columns(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The frame with a ``variant`` column, and the columns whose values name a table
    column: the method always, the others only when the rows differ in them."""
    frame = frame.assign(variant=settings_variants(frame))
    keys = ["method"] + [k for k in SPLIT_BY if k in frame and frame[k].nunique() > 1]
    if (frame["variant"] != "").any():
        keys.append("variant")
    return frame, keys


def column_labels(frame: pd.DataFrame) -> pd.Series:
    """One label per row: its column's name, the key values joined by " / "."""
    frame, keys = with_columns(frame)
    return frame[keys].astype(str).agg(lambda parts: " / ".join(p for p in parts if p), axis=1)
