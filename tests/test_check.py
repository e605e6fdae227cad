"""`bench check`: matching cells by identity, tolerances, the verdict, and a real tiny gate."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.check.baseline import Baseline, baseline_cells, load_baseline, save_baseline
from bench.check.gate import check_rows, deterministic, format_result
from bench.cli import main
from bench.errors import BenchError
from bench.extractor import FeatureExtractor

METRICS = {"image_auroc": 0.9, "pixel_auroc": 0.95, "aupro": 0.8, "aupro_model_res": 0.79}


def _row(method: str, category: str, **metrics: float | None) -> dict[str, Any]:
    return {
        "method": method,
        "dataset": "synthetic",
        "category": category,
        "backbone": "resnet18",
        "seed": 0,
        "reference": "original",
        "weights_id": "random",
        "settings": {"input_size": 64, "epochs": 1},
        "fit_seconds": random.random(),  # timing: never compared
        **{**METRICS, **metrics},
    }


def _baseline(rows: list[dict[str, Any]], **tolerances: float) -> Baseline:
    return Baseline(
        {"methods": ["fastflow", "padim"]}, tolerances or {"default": 0.02}, baseline_cells(rows)
    )


ROWS = [_row(m, c) for m in ("fastflow", "padim") for c in ("brick", "washer")]


def test_identical_rows_in_another_order_pass() -> None:
    shuffled = list(reversed(copy.deepcopy(ROWS)))
    shuffled[0]["settings"] = dict(reversed(list(shuffled[0]["settings"].items())))
    result = check_rows(_baseline(ROWS), shuffled)
    assert result.passed
    assert len(result.comparisons) == 36  # 9 metrics x 4 cells; the 5 absent on both sides pass
    assert "PASS: 16 metrics of 4 cells" in format_result(result, Path("b.json"))


def test_a_drop_beyond_the_tolerance_fails_with_a_table() -> None:
    now = copy.deepcopy(ROWS)
    now[1]["aupro"] = 0.7  # fastflow/washer
    now[2]["image_auroc"] = 0.89  # within 0.02
    result = check_rows(_baseline(ROWS), now)
    assert not result.passed
    [bad] = result.of("regression")
    assert (bad.cell, bad.metric) == ("fastflow/synthetic/washer/resnet18/seed0", "aupro")
    assert bad.delta == pytest.approx(-0.1)
    text = format_result(result, Path("b.json"))
    assert "REGRESSIONS" in text and "-0.1000" in text
    assert any(line.startswith("FAIL: b.json") for line in text.splitlines())


def test_a_drop_too_small_for_four_decimals_is_still_shown_as_one() -> None:
    now = copy.deepcopy(ROWS)
    now[3]["pixel_auroc"] = METRICS["pixel_auroc"] - 3e-6
    result = check_rows(_baseline(ROWS), now)
    assert result.passed
    assert "; largest drop -3.0e-06 (padim/synthetic/washer" in format_result(result, Path("b"))


def test_an_improvement_is_reported_and_passes() -> None:
    now = copy.deepcopy(ROWS)
    now[0]["pixel_auroc"] = 0.99
    result = check_rows(_baseline(ROWS), now)
    assert result.passed
    assert [c.metric for c in result.of("improvement")] == ["pixel_auroc"]
    assert "--update" in format_result(result, Path("b.json"))


def test_per_metric_tolerance_default_and_override() -> None:
    now = copy.deepcopy(ROWS)
    now[0]["image_auroc"] = 0.86  # -0.04
    now[0]["aupro"] = 0.77  # -0.03
    loose_image = _baseline(ROWS, default=0.02, image_auroc=0.05)
    assert [c.metric for c in check_rows(loose_image, now).of("regression")] == ["aupro"]
    assert check_rows(loose_image, now, tolerance=0.05).passed
    assert len(check_rows(loose_image, now, tolerance=0.0).of("regression")) == 2


def test_missing_cells_on_either_side_fail() -> None:
    extra = [*ROWS[:3], _row("cflow", "brick")]
    result = check_rows(_baseline(ROWS), extra)
    assert not result.passed
    assert result.missing_in_run == [
        "padim/synthetic/washer/resnet18/seed0: in the baseline, not in the run"
    ]
    assert result.missing_in_baseline == [
        "cflow/synthetic/brick/resnet18/seed0: in the run, not in the baseline"
    ]
    assert not check_rows(_baseline(ROWS), []).passed


def test_a_changed_setting_is_named() -> None:
    now = copy.deepcopy(ROWS)
    now[0]["settings"]["epochs"] = 2
    result = check_rows(_baseline(ROWS), now)
    assert result.changed == [
        "fastflow/synthetic/brick/resnet18/seed0: settings changed (baseline -> run: epochs 1 -> 2)"
    ]
    assert not result.passed


def test_a_metric_absent_on_one_side_fails() -> None:
    base = [_row("padim", "brick", pixel_auroc=None)]
    assert check_rows(_baseline(base), [_row("padim", "brick", pixel_auroc=None)]).passed
    result = check_rows(_baseline(base), [_row("padim", "brick")])
    assert [c.status for c in result.comparisons if c.metric == "pixel_auroc"] == ["absent"]
    assert not result.passed


def test_file_round_trip_and_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    save_baseline(path, _baseline(ROWS, default=0.01, aupro=0.03))
    loaded = load_baseline(path)
    assert loaded.tolerance("aupro") == 0.03 and loaded.tolerance("pixel_auroc") == 0.01
    assert check_rows(loaded, ROWS).passed
    data = json.loads(path.read_text())
    for change, message in (
        ({"format": "x"}, "not a baseline file"),
        ({"tolerances": {"auroc": 0.1}}, "unknown tolerance 'auroc'"),
        ({"tolerances": {"default": -1}}, "must be a number >= 0"),
        ({"cells": [{"method": "a"}]}, "cell 0 has no 'metrics'"),
        ({"config": {"epoch": 3}}, "unknown 'config' keys epoch"),
    ):
        path.write_text(json.dumps({**data, **change}))
        with pytest.raises(BenchError, match=message):
            load_baseline(path)
    with pytest.raises(BenchError, match="no such file"):
        load_baseline(tmp_path / "absent.json")


def test_deterministic_is_restored_afterwards() -> None:
    threads = torch.get_num_threads()
    with deterministic(1):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.get_num_threads() == 1
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.get_num_threads() == threads


def test_building_an_extractor_leaves_the_global_rng_alone() -> None:
    """A cached extractor and a fresh one must leave a cell the same random stream."""
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    FeatureExtractor("resnet18", ["layer1"], "random", input_size=(32, 32))
    assert torch.equal(torch.rand(3), expected)


def _metrics(folder: Path) -> dict[str, dict[str, Any]]:
    import sqlite3

    with sqlite3.connect(folder / "results.sqlite") as db:
        rows = [json.loads(r) for (r,) in db.execute("SELECT row FROM cells WHERE status='done'")]
    return {r["cell_key"]: {k: r[k] for k in METRICS} for r in rows}


@pytest.mark.slow
def test_check_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Make a baseline, rerun it bit for bit, then catch a tampered number and bad usage."""
    baseline = tmp_path / "ci.json"
    grid = ["--methods", "padim,fastflow", "--categories", "brick", "--input-size", "64"]
    grid += ["--epochs", "1", "--weights", "random", "--device", "cpu"]
    assert (
        main(
            ["check", "--baseline", str(baseline), "--update", *grid, "--out", str(tmp_path / "a")]
        )
        == 0
    )
    recorded = json.loads(baseline.read_text())
    assert recorded["config"]["threads"] == 1 and recorded["config"]["workers"] == 0
    assert len(recorded["cells"]) == 2

    assert main(["check", "--baseline", str(baseline), "--out", str(tmp_path / "b")]) == 0
    assert "PASS: 18 metrics of 2 cells" in capsys.readouterr().out
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")  # deterministic, bit for bit

    recorded["cells"][0]["metrics"]["pixel_auroc"] += 0.1
    baseline.write_text(json.dumps(recorded))
    assert main(["check", "--baseline", str(baseline), "--run", str(tmp_path / "b")]) == 1
    out = capsys.readouterr().out
    assert "REGRESSIONS" in out and "pixel_auroc" in out and "-0.1000" in out

    assert main(["check", "--baseline", str(baseline), "--epochs", "2"]) == 2
    assert "edit its 'config'" in capsys.readouterr().err
