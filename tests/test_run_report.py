"""Figures, saved anomaly-map examples and report.md, rebuilt from a run folder alone."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.cli import main
from bench.datasets.base import Sample
from bench.datasets.pipeline import Preprocess
from bench.report.figures import write_figures
from bench.report.markdown import write_report
from bench.runner import examples


def _sample(name: str, label: int, image: np.ndarray) -> Sample:
    return Sample(image, label, None, name.split("/")[0], name)


def test_pick_spreads_over_defects_and_adds_one_normal() -> None:
    image = np.zeros((8, 8, 3), np.uint8)
    names = ["good/001", "b/000", "good/000", "a/001", "a/000", "c/000", "b/001"]
    samples = [_sample(n, 0 if n.startswith("good") else 1, image) for n in names]
    picked = [samples[i].name for i in examples.pick(samples)]
    assert picked == ["a/000", "b/000", "c/000", "good/000"]
    assert [samples[i].name for i in examples.pick(samples[:3])] == ["b/000", "good/000"]


def test_collect_shrinks_and_keeps_raw_scores() -> None:
    rng = np.random.default_rng(0)
    samples = [
        _sample(f"d/{i:03d}", 1, rng.integers(0, 255, (300, 300, 3), np.uint8)) for i in range(5)
    ]
    samples.append(_sample("good/000", 0, np.zeros((300, 300, 3), np.uint8)))
    pre = Preprocess((256, 256), (224, 224))
    maps = np.stack([np.full((224, 224), 100.0 * i, np.float32) for i in range(6)])
    masks = np.zeros((6, 224, 224), np.uint8)
    masks[0, :112] = 1
    found = examples.collect(samples, pre, masks, maps)
    assert list(found["names"]) == ["d/000", "d/002", "d/004", "good/000"]
    assert found["images"].shape == (4, 128, 128, 3) and found["images"].dtype == np.uint8
    assert found["maps"].dtype == np.float16 and found["maps"][:, 0, 0].tolist() == [
        0,
        200,
        400,
        500,
    ]
    assert found["masks"][0, :64].all() and not found["masks"][0, 64:].any()
    assert float(found["field"]) == pytest.approx(224 / 256)
    huge = examples.collect(samples, pre, masks, maps * 1e4)
    assert huge["maps"].dtype == np.float32  # beyond float16's range: kept exact


def _real_run(folder: Path, *extra: str) -> None:
    code = main(
        [
            "run",
            "--methods",
            "padim,fastflow",
            "--categories",
            "brick",
            "--input-size",
            "64",
            "--epochs",
            "1",
            "--weights",
            "random",
            "--out",
            str(folder),
            *extra,
        ]
    )
    assert code == 0


def test_run_writes_report_and_bench_report_rebuilds_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _real_run(run)
    report = (run / "report.md").read_text()
    assert "## Results" in report and "| brick |" in report
    assert "![AUROC per category](figures/auroc_by_category.png)" in report
    assert "![Anomaly maps, brick](figures/gallery_brick.png)" in report
    assert "figures/accuracy_vs_latency.png" in report  # every cell is profiled
    assert (run / "figures" / "accuracy_vs_latency.png").is_file()
    assert "No paper table covers this run (datasets: synthetic)." in report
    assert len(list((run / "examples").glob("*.npz"))) == 2
    with Image.open(run / "figures" / "gallery_brick.png") as first:
        assert first.width > 300 and first.height > 300

    for generated in ("figures", "paper"):
        shutil.rmtree(run / generated, ignore_errors=True)
    for name in ("report.md", "tables.md", "results.csv"):
        (run / name).unlink()
    assert main(["report", str(run)]) == 0
    assert (run / "report.md").read_text() == report
    for name in ("auroc_by_category.png", "gallery_brick.png"):
        with Image.open(run / "figures" / name) as image:
            assert image.width > 300
    assert (run / "tables.md").is_file() and (run / "results.csv").is_file()

    # Reading a run folder needs neither torch nor timm, and figures drawn from the same rows
    # are reused without importing matplotlib: `bench report` starts fast.
    code = (
        f"import sys; from bench.cli import main; assert main(['report', {str(run)!r}]) == 0; "
        "print(sorted(m for m in ('torch', 'timm', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert (run / "report.md").read_text() == report


def _row(method: str, backbone: str, category: str, auroc: float, **extra) -> dict:
    return {
        "dataset": "mvtec",
        "category": category,
        "method": method,
        "base_method": method,
        "backbone": backbone,
        "seed": 0,
        "reference": "original",
        "weights": "random(seed=0)",
        "pretrained": False,
        "input": "resize 64x64 (bilinear)",
        "image_auroc": auroc,
        "pixel_auroc": auroc,
        "aupro": auroc,
        "trainable_params": 10,
        "settings": {},
        "cell_key": f"{method}-{backbone}-{category}",
        **extra,
    }


def test_figures_from_rows_alone_and_paper_tables_in_the_report(tmp_path: Path) -> None:
    rows = [
        _row(m, b, c, a, latency_e2e_ms=lat)
        for m, lat, a in (("padim", 20.0, 0.9), ("fastflow", 8.0, 0.8))
        for b in ("resnet18", "wide_resnet50_2")
        for c in ("bottle", "cable")
    ]
    figures = {f.title: f for f in write_figures(tmp_path, rows)}
    assert (
        figures["Image AUROC against latency"].path
        == tmp_path / "figures" / "accuracy_vs_latency.png"
    )
    with Image.open(figures["AUROC per category"].path) as image:
        assert image.width > 300
    assert figures["Anomaly maps"].note.startswith("skipped: no cell saved anomaly maps")
    assert len(figures) == 3  # one note for all categories, not one each

    write_report(tmp_path, rows)
    report = (tmp_path / "report.md").read_text()
    drawn = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "figures").glob("*.png")}
    write_report(tmp_path, rows)  # the same rows: the figures are reused as drawn
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "figures").glob("*.png")} == drawn
    assert (tmp_path / "report.md").read_text() == report
    (tmp_path / "figures" / "auroc_by_category.png").unlink()  # a figure gone: all redrawn
    write_report(tmp_path, rows)
    assert (tmp_path / "figures" / "auroc_by_category.png").is_file()
    redrawn = (tmp_path / "figures" / "accuracy_vs_latency.png").stat().st_mtime_ns
    assert redrawn != drawn["accuracy_vs_latency.png"]
    rows[0]["image_auroc"] = 0.5  # another value: redrawn again
    write_report(tmp_path, rows)
    assert (tmp_path / "figures" / "accuracy_vs_latency.png").stat().st_mtime_ns != redrawn
    assert "[paper/padim-mvtec.md](paper/padim-mvtec.md)" in report
    assert "[paper/fastflow-backbones.md](paper/fastflow-backbones.md)" in report
    assert "Not comparable with the paper" in report
    assert "cflow-mvtec" not in report  # no CFLOW-AD rows: that table is left out


def test_unprofiled_run_says_why_the_latency_figure_is_missing(tmp_path: Path) -> None:
    _real_run(tmp_path, "--no-profile")
    report = (tmp_path / "report.md").read_text()
    assert "**Image AUROC against latency**: skipped: the result rows have no latency_e2e_ms" in (
        report
    )
    assert not (tmp_path / "figures" / "accuracy_vs_latency.png").exists()


def test_tables_whose_every_cell_is_empty_are_left_out_with_a_reason(tmp_path) -> None:
    from bench.report.tables import results_frame, write_tables

    rows = [
        {"dataset": "cifar10", "category": c, "method": "padim", "backbone": "resnet18",
         "reference": "original", "seed": 0, "weights": "random(seed=0)", "pretrained": False,
         "image_auroc": 0.7, "pixel_auroc": None, "aupro": None}
        for c in ("cat", "dog")
    ]  # fmt: skip
    text = write_tables(results_frame(rows), tmp_path)
    assert "image AUROC (%)" in text and "pixel AUROC (%)" not in text
    assert "Not shown, no cell has a value: pixel AUROC, AUPRO" in text


def test_cells_log_one_line_each_without_a_terminal(tmp_path) -> None:
    import io

    from bench.runner.cell import Cell
    from bench.runner.run import CellLog

    stream = io.StringIO()
    log = CellLog(2, enabled=True, stream=stream)
    cell = Cell("fastflow", "fastflow", "mvtec", "bottle", "resnet18", 0, "original", "r", {})
    log.finished(cell, {"image_auroc": 0.981, "pixel_auroc": 0.972, "fit_seconds": 41.2})
    log.finished(cell, {"image_auroc": 0.5, "pixel_auroc": None, "fit_seconds": 3})
    first, second = stream.getvalue().splitlines()
    assert first.startswith(
        "[1/2] fastflow bottle resnet18 seed 0: image 0.981 pixel 0.972, fit 41 s; ETA"
    )
    assert second == "[2/2] fastflow bottle resnet18 seed 0: image 0.500, fit 3 s"


def test_cli_warnings_are_one_line(monkeypatch) -> None:
    import warnings

    from bench import cli

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    assert cli.main(["paper", "--list"]) == 0
    assert warnings.formatwarning is cli._one_line_warning
    text = warnings.formatwarning("USING RANDOM INITIALISATION", UserWarning, "x.py", 1, "src")
    assert text == "warning: USING RANDOM INITIALISATION\n"


def test_cli_says_each_warning_once_per_command(monkeypatch) -> None:
    import warnings

    from bench import cli

    said: list[str] = []
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    monkeypatch.setattr(warnings, "showwarning", lambda message, *rest: said.append(str(message)))
    assert cli.main(["paper", "--list"]) == 0
    for text in ("weights a unavailable", "weights b unavailable", "weights a unavailable"):
        warnings.showwarning(UserWarning(text), UserWarning, "x.py", 1)
    assert said == ["weights a unavailable", "weights b unavailable"]
    assert cli.main(["paper", "--list"]) == 0  # a new command: its own memory, no wrapping twice
    warnings.showwarning(UserWarning("weights a unavailable"), UserWarning, "x.py", 1)
    assert said[-1] == "weights a unavailable" and len(said) == 3


def test_ci_tables_show_test_image_or_seed_intervals() -> None:
    import pandas as pd

    from bench.report.tables import metric_table

    rows = [
        {"category": "brick", "method": "padim", "backbone": "r", "reference": "o", "seed": s,
         "image_auroc": v, "image_auroc_lo": v - 0.02, "image_auroc_hi": v + 0.01}
        for s, v in ((0, 0.90), (1, 0.94))
    ]  # fmt: skip
    one = metric_table(pd.DataFrame(rows[:1]), "image_auroc", ci=True)
    assert one.loc["brick", "padim"] == "90.0 [88.0, 91.0]"
    two = metric_table(pd.DataFrame(rows), "image_auroc", ci=True)
    # mean 92.0, t(0.975, 1) = 12.706, sd/sqrt(2) = 2.0 -> +-25.4
    assert two.loc["brick", "padim"] == "92.0 [66.6, 117.4]"


def test_rows_made_differently_are_never_averaged_into_one_column(tmp_path: Path) -> None:
    import pandas as pd

    from bench.report.figures import series_labels
    from bench.report.tables import metric_table, results_frame, write_tables

    small = {"input_size": 96, "blur_sigma": 4.0}
    rows = [
        _row("padim", "resnet18", "bottle", 0.90, settings=small),
        _row("padim", "resnet18", "bottle", 0.96, settings={**small, "input_size": 128}),
        _row("padim", "resnet18", "bottle", 0.80, settings=small, weights="r18.pt (sha256 ab)"),
        _row("fastflow", "resnet18", "bottle", 0.70, settings={"input_size": 256}),
    ]
    frame = results_frame(rows)
    table = metric_table(frame, "image_auroc")
    assert table.loc["bottle"].to_dict() == {
        "padim / random(seed=0) / input_size=96": "90.0",
        "padim / random(seed=0) / input_size=128": "96.0",
        "padim / r18.pt (sha256 ab) / input_size=96": "80.0",
        "fastflow / random(seed=0)": "70.0",
    }
    assert list(series_labels(frame)) == list(table.columns)
    write_tables(frame, tmp_path, ["image_auroc"])
    numeric = pd.read_csv(tmp_path / "tables.csv")
    assert numeric["count"].tolist() == [1, 1, 1, 1]
    assert sorted(numeric["weights"].unique()) == ["r18.pt (sha256 ab)", "random(seed=0)"]

    alike = results_frame([rows[0], {**rows[0], "seed": 1, "image_auroc": 0.94}])
    assert metric_table(alike, "image_auroc").columns.tolist() == ["padim"]  # seeds: one column


def _truncated_png(path: Path) -> None:
    Image.new("RGB", (64, 64), 90).save(path)
    path.write_bytes(path.read_bytes()[:60])  # header intact, pixel data cut off


def test_one_line_finds_the_message_of_an_error_in_a_dataloader_worker(tmp_path: Path) -> None:
    import torch

    from bench.datasets.pipeline import ImageSet
    from bench.errors import BenchError, one_line

    image = tmp_path / "corrupt" / "001.png"
    image.parent.mkdir()
    _truncated_png(image)
    images = ImageSet([Sample(image, 0, None, "good", "good/001")], Preprocess((32, 32)))
    with pytest.raises(BenchError) as caught:
        list(torch.utils.data.DataLoader(images, num_workers=1))
    text = str(caught.value)
    assert text.startswith("Caught BenchError in DataLoader worker process 0.")
    line = one_line(text)
    assert line.startswith(f"BenchError: {image}: unreadable image (") and "\n" not in line
    # as --debug stores it: the driver's traceback after the worker's
    debug = f"BenchError: {text}\nTraceback (most recent call last):\n  File ...\n{text}"
    assert one_line(debug) == line
    assert one_line("KeyError: 'x'\nTraceback (most recent call last):") == "KeyError: 'x'"


def test_a_cell_that_fails_in_an_image_worker_names_the_file(tmp_path: Path, capsys) -> None:
    from test_datasets import make_mvtec

    root = make_mvtec(tmp_path / "data", train=3)
    corrupt = root / "bottle" / "train" / "good" / "001.png"
    _truncated_png(corrupt)
    args = ["run", "--dataset", "mvtec", "--data-root", str(root), "--methods", "padim"]
    args += ["--input-size", "32", "--weights", "random", "--workers", "1", "--no-profile"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    expected = f"padim/resnet18/bottle/seed0: BenchError: {corrupt}: unreadable image ("
    assert f"FAILED {expected}" in err and f"  {expected}" in err
    assert "DataLoader worker" not in err


def test_debug_prints_the_traceback_of_each_failed_cell(tmp_path: Path, capsys) -> None:
    # CFLOW-AD's reflect padding cannot take 32 px: the cell fails before building anything.
    args = ["run", "--methods", "cflow", "--categories", "brick", "--input-size", "32"]
    args += ["--out", str(tmp_path)]
    assert main(args) == 1
    quiet = capsys.readouterr().err
    assert "FAILED cflow/resnet18/brick/seed0: cflow: --input-size 32" in quiet
    assert "Traceback" not in quiet
    assert main(["--debug", *args, "--force"]) == 1
    loud = capsys.readouterr().err
    failed = loud[loud.index("FAILED cflow/resnet18/brick/seed0: BenchError: cflow") :]
    assert failed.splitlines()[1] == "Traceback (most recent call last):"
    assert "in encoder_padding" in failed


def test_interrupt_names_the_run_folder_only_where_there_is_one(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    import bench
    from bench.paper import reproduce
    from bench.runner import catalog

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run", interrupted)
    monkeypatch.setattr(catalog, "cached_listing", interrupted)
    monkeypatch.setattr(reproduce, "reproduce", interrupted)
    assert main(["run", "--methods", "padim", "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err == (
        f"interrupted; the finished cells are kept in {tmp_path}: rerun the same command to "
        f"resume, or `bench report {tmp_path}` for the tables of what finished\n"
    )
    assert main(["paper", "padim-mvtec"]) == 130
    folder = Path("results") / "paper-padim-mvtec"
    assert f"kept in {folder}: rerun the same command" in capsys.readouterr().err
    assert main(["list"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_version_is_the_installed_packages_and_needs_no_torch() -> None:
    from importlib.metadata import version

    code = (
        "import sys; from bench.cli import main\n"
        "try: main(['--version'])\n"
        "except SystemExit as exit: print(exit.code, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [f"bench {version('flowad-bench')}", "0 False"]


def test_a_run_with_no_finished_cell_still_gets_a_report(tmp_path: Path) -> None:
    (figure,) = write_figures(tmp_path, [])
    assert figure.path is None and figure.note == "skipped: no cell of this run finished"
    write_report(tmp_path, [], [("padim/resnet18/bottle/seed0", "BenchError: boom\nmore")])
    report = (tmp_path / "report.md").read_text()
    assert "0 cells finished, 1 failed." in report
    assert "- failed: padim/resnet18/bottle/seed0: BenchError: boom\n" in report
