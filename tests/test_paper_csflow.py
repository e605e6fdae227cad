"""The CS-Flow paper table: it loads, every number has a status and a listed source, and
the grid runs the method and backbone the table matches."""

from __future__ import annotations

import pytest

from bench.paper.published import STATUSES, load_table, table_names
from bench.registry import DATASETS, METHODS


def test_csflow_table_loads_with_sourced_numbers() -> None:
    assert "csflow-mvtec" in table_names()
    table = load_table("csflow-mvtec")
    assert table.dataset == "mvtec" and table.backbones == ["tf_efficientnet_b5"]
    categories = DATASETS.get("mvtec").categories
    assert [row.id for row in table.rows] == [*categories, "mean"]
    assert [column.metric for column in table.columns] == ["image_auroc"]
    assert {row for row, _ in table.numbers} == {*categories, "mean"}
    for number in table.numbers.values():
        assert number.status in STATUSES
        for source in number.source.split("; "):
            assert source in table.sources
    assert table.published("toothbrush", "image").value == pytest.approx(91.9)
    assert table.published("mean", "image").text == "98.7"
    per_category = [table.published(c, "image").value for c in categories]
    assert sum(per_category) / len(per_category) == pytest.approx(98.72)
    assert all(grid["methods"] == ["csflow"] for grid in table.grids)
    assert "csflow" in METHODS.names()
