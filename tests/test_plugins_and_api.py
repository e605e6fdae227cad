"""A third-party plugin installed through an entry point, and the Python API against the CLI."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest
from test_datasets import make_mvtec

import bench
from bench import registry
from bench.cli import main

EXAMPLE = Path(__file__).parent / "example_plugin" / "flowad_mean_distance.py"
GRID = {
    "dataset": "mvtec",
    "categories": "bottle",
    "input_size": 32,
    "weights": "random",
    "workers": 0,
    "profile": False,
}
# Wall-clock and memory columns differ between two runs of the same cell; nothing else may.
MEASURED = {"feature_seconds", "fit_seconds", "test_seconds", "metric_seconds", "peak_memory_mb"}


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    make_mvtec(root, "bottle", train=4, test={"good": 2, "crack": 2})
    return root


@pytest.fixture
def installed_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The example installed as pip would: the module plus a dist-info with its entry point."""
    site = tmp_path / "site"
    site.mkdir()
    (site / EXAMPLE.name).write_text(EXAMPLE.read_text())
    info = site / "flowad_mean_distance-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: flowad-mean-distance\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text(
        f"[{registry.ENTRY_POINT_GROUP}]\nmean-distance = flowad_mean_distance\n"
    )
    registry.load_plugins()  # the built-ins first, so only the plugin is new below
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(registry.METHODS, "_entries", dict(registry.METHODS._entries))
    monkeypatch.setattr(registry, "_loaded", set())
    monkeypatch.delitem(sys.modules, "flowad_mean_distance", raising=False)
    return "mean-distance"


def test_entry_point_plugin_runs_like_a_built_in(installed_plugin, data_root, tmp_path) -> None:
    assert installed_plugin in registry.METHODS.names()
    result = bench.run(
        methods=installed_plugin, data_root=str(data_root), out=str(tmp_path / "run"), **GRID
    )
    (row,) = result.results.to_dict("records")
    assert row["method"] == "mean-distance" and row["base_method"] == "mean-distance"
    assert 0.0 <= row["image_auroc"] <= 1.0 and 0.0 <= row["pixel_auroc"] <= 1.0
    assert row["settings"] == '{"batch_size": 16, "input_size": 32, "layer": "layer2"}'
    assert row["trainable_params"] == 0


def test_api_returns_what_the_cli_writes(data_root: Path, tmp_path: Path) -> None:
    cli_out, api_out = tmp_path / "cli", tmp_path / "api"
    flags = ["--dataset", "mvtec", "--categories", "bottle", "--input-size", "32"]
    flags += ["--weights", "random", "--workers", "0", "--no-profile", "--methods", "padim"]
    assert main(["run", *flags, "--data-root", str(data_root), "--out", str(cli_out)]) == 0
    result = bench.run(methods=["padim"], data_root=str(data_root), out=str(api_out), **GRID)
    assert result.folder == api_out and not result.failures
    api_csv = pd.read_csv(api_out / "results.csv")
    cli_csv = pd.read_csv(cli_out / "results.csv")
    # the DataFrame is the run's results.csv...
    assert result.results.to_csv(index=False) == (api_out / "results.csv").read_text()
    # ...and the CLI's, for the same grid, up to what a clock measures
    stable = [c for c in cli_csv if c not in MEASURED]
    assert list(api_csv.columns) == list(cli_csv.columns)
    pd.testing.assert_frame_equal(api_csv[stable], cli_csv[stable])


def test_api_rejects_unknown_options() -> None:
    with pytest.raises(bench.errors.BenchError, match="unknown option epoch"):
        bench.run(methods="padim", epoch=3)


def test_every_metric_has_bounds_and_tables_can_show_them(data_root: Path, tmp_path: Path) -> None:
    from bench.metrics import INTERVAL_COLUMNS, METRIC_LABELS

    result = bench.run(
        methods="padim",
        data_root=str(data_root),
        out=str(tmp_path / "ci"),
        bootstrap=200,
        table_metrics="image_auroc,image_ap",
        ci=True,
        **GRID,
    )
    row = result.results.iloc[0]
    assert set(METRIC_LABELS) | set(INTERVAL_COLUMNS) <= set(result.results.columns)
    assert row["image_auroc_lo"] <= row["image_auroc"] <= row["image_auroc_hi"]
    assert (result.folder / "evidence" / f"{row['cell_key']}.npz").is_file()
    assert "image AP (%)" in result.tables and "pixel AUROC (%)" not in result.tables
    assert f"{100 * row['image_auroc']:.1f} [" in result.tables
    with pytest.raises(bench.errors.BenchError, match="--metrics nope"):
        bench.run(methods="padim", table_metrics="nope")


def test_compare_names_real_differences(data_root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "pair"
    bench.run(
        methods="padim,fastflow",
        epochs=1,
        batch_size=2,  # four training images: FastFlow drops an incomplete last batch
        data_root=str(data_root),
        out=str(out),
        **GRID,
    )
    assert main(["compare", str(out), "--methods", "padim,fastflow", "--resamples", "200"]) == 0
    text = capsys.readouterr().out
    assert "image AUROC: padim − fastflow" in text
    assert "| bottle | resnet18 | 0 |" in text and "sign test" in text
    assert main(["compare", str(out), "--methods", "padim,cflow"]) == 2


def test_report_ranks_methods_over_five_categories(tmp_path: Path) -> None:
    from bench.report.compare import method_ranks, ranks_figure

    rows = [
        {"method": m, "backbone": "resnet18", "category": f"c{i}", "image_auroc": base + i / 100}
        for m, base in (("a", 0.9), ("b", 0.8), ("c", 0.7))
        for i in range(5)
    ]
    ranks = ranks_figure(rows, tmp_path / "cd.png")
    assert ranks is not None and (tmp_path / "cd.png").is_file()
    assert dict(zip(ranks.methods, ranks.mean_ranks, strict=True))["a / resnet18"] == 1.0
    assert method_ranks(rows[:4] + rows[5:9] + rows[10:14]) is None  # four categories
