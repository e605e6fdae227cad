"""`bench run` end to end on a tiny MVTec-layout folder: store, resume, --force, failures."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_datasets import make_mvtec

import bench.runner.cell
from bench.cli import main
from bench.runner.store import EVIDENCE_FOLDER, STORE_NAME


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    make_mvtec(root, "bottle", train=4, test={"good": 2, "crack": 2})
    make_mvtec(root, "screw", train=4, test={"good": 2, "crack": 2})
    return root


def _run(data_root: Path, out: Path, *extra: str, methods: str = "padim") -> int:
    return main(
        [
            "run",
            "--methods",
            methods,
            "--dataset",
            "mvtec",
            "--data-root",
            str(data_root),
            "--categories",
            "bottle,screw",
            "--input-size",
            "32",
            "--weights",
            "random",
            "--workers",
            "0",
            "--epochs",
            "1",
            "--out",
            str(out),
            *extra,
        ]
    )


def _stored(out: Path) -> list[tuple[str, str, dict | None]]:
    with sqlite3.connect(out / STORE_NAME) as db:
        rows = db.execute("SELECT status, label, row FROM cells ORDER BY label").fetchall()
    return [(s, label, json.loads(r) if r else None) for s, label, r in rows]


def _count_cells(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    real = bench.runner.cell.run_cell

    def counting(cell, env):
        seen.append(cell.label())
        return real(cell, env)

    monkeypatch.setattr("bench.runner.executors.run_cell", counting)
    return seen


def test_run_writes_rows_tables_and_resumes(data_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    seen = _count_cells(monkeypatch)
    assert _run(data_root, out) == 0
    stored = _stored(out)
    assert [(s, label) for s, label, _ in stored] == [
        ("done", "padim/resnet18/bottle/seed0"),
        ("done", "padim/resnet18/screw/seed0"),
    ]
    row = stored[0][2]
    assert row["weights"] == "random(seed=0)" and row["pretrained"] is False
    assert row["reference"] == "original" and 0.0 <= row["image_auroc"] <= 1.0
    for name in ("results.csv", "tables.md", "tables.tex", "run.json"):
        assert (out / name).is_file(), name
    assert "image AUROC" in capsys.readouterr().out
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["command"].startswith("bench run --methods padim")
    assert run_json["versions"]["torch"] and run_json["hardware"]["cpu_count"]
    assert run_json["versions"]["pillow"]  # it resizes every image
    hardware = run_json["hardware"]
    assert hardware["cpu_workers"] == (2 if hardware["torch_threads"] >= 2 else 1)
    assert hardware["linear_backend"] in ("onednn", "default") and "cpu_vendor" in hardware
    assert len(seen) == 2

    assert _run(data_root, out) == 0  # the same command again: nothing to do
    assert len(seen) == 2
    assert _run(data_root, out, "--force") == 0
    assert len(seen) == 4
    assert len(_stored(out)) == 2
    assert len(json.loads((out / "run.json").read_text())["invocations"]) == 3


def test_rows_made_from_other_images_are_not_passed_off_as_done(
    data_root, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    seen = _count_cells(monkeypatch)
    assert _run(data_root, out) == 0
    before = _stored(out)
    moved = tmp_path / "moved"  # the same images elsewhere: still done
    shutil.copytree(data_root, moved)
    assert _run(moved, out) == 0 and len(seen) == 2

    train = moved / "bottle" / "train" / "good"
    shutil.copy(train / "000.png", train / "100.png")
    capsys.readouterr()
    assert _run(moved, out) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {out}: 1 finished cell(s) would not be what this command")
    assert "padim/resnet18/bottle/seed0 was made from other images (4 training and 4 test " in err
    assert "5 and 4 now" in err and "--force" in err
    assert len(seen) == 2 and _stored(out) == before  # nothing ran, nothing replaced

    assert _run(moved, out, "--force") == 0
    assert {label: row["n_train"] for _, label, row in _stored(out)} == {
        "padim/resnet18/bottle/seed0": 5,
        "padim/resnet18/screw/seed0": 4,
    }


def test_rows_made_with_other_weights_are_not_passed_off_as_done(
    data_root, tmp_path, monkeypatch, capsys
):
    import timm
    import torch

    checkpoint = tmp_path / "r18.pt"
    torch.manual_seed(1)
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), checkpoint)
    out = tmp_path / "run"
    extra = ("--weights", str(checkpoint))  # the later one wins over _run's random
    assert _run(data_root, out, *extra) == 0
    assert _run(data_root, out, *extra) == 0  # unchanged file: done
    torch.manual_seed(2)
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), checkpoint)
    capsys.readouterr()
    assert _run(data_root, out, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    old = _stored(out)[0][2]["weights_id"]
    assert f"{checkpoint} (sha256 {old}), and --weights {checkpoint} now gives " in err
    assert _run(data_root, out, *extra, "--force") == 0
    assert _stored(out)[0][2]["weights_id"] != old


def test_an_auto_run_that_fell_back_to_random_is_redone_once_weights_are_cached(
    data_root, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("bench.extractor._cached_weights_file", lambda tag: None)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="USING RANDOM INITIALISATION"):
        assert _run(data_root, out, "--weights", "auto") == 0
    assert _stored(out)[0][2]["weights_id"] == "random"
    assert _run(data_root, out, "--weights", "auto") == 0  # still offline, still random: done

    monkeypatch.setattr("bench.extractor._cached_weights_file", lambda tag: "/cache/model.bin")
    capsys.readouterr()
    assert _run(data_root, out, "--weights", "auto") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "made with weights random(seed=0), and --weights auto now gives resnet18." in err


def test_a_run_of_some_methods_keeps_the_folder_files_whole(data_root, tmp_path):
    import bench

    out = tmp_path / "run"
    assert _run(data_root, out) == 0
    result = bench.run(
        methods="fastflow", dataset="mvtec", data_root=str(data_root), categories="bottle",
        input_size=32, weights="random", workers=0, epochs=1, out=str(out),
        set={"fastflow": {"batch_size": 2}},
    )  # fmt: skip
    assert result.results["method"].tolist() == ["fastflow"]
    written = pd.read_csv(out / "results.csv")
    assert sorted(zip(written["method"], written["category"], strict=True)) == [
        ("fastflow", "bottle"),
        ("padim", "bottle"),
        ("padim", "screw"),
    ]
    tables = (out / "tables.md").read_text()
    assert "| category | padim | fastflow |" in tables
    means = [line for line in tables.splitlines() if line.startswith("| **mean** |")]
    assert len(means) == 3 and all(line.endswith(" (1 of 2 categories) |") for line in means)


def test_failing_cell_is_recorded_and_the_run_goes_on(data_root, tmp_path, monkeypatch, capsys):
    real = bench.runner.cell.run_cell

    def flaky(cell, env):
        if cell.category == "bottle":
            raise RuntimeError("disk on fire")
        return real(cell, env)

    monkeypatch.setattr("bench.runner.executors.run_cell", flaky)
    out = tmp_path / "run"
    assert _run(data_root, out) == 1
    stored = {label: (status, row) for status, label, row in _stored(out)}
    assert stored["padim/resnet18/bottle/seed0"][0] == "failed"
    assert stored["padim/resnet18/screw/seed0"][0] == "done"
    err = capsys.readouterr().err
    assert "1 of 2 cells failed" in err and "disk on fire" in err
    with sqlite3.connect(out / STORE_NAME) as db:
        (error,) = db.execute("SELECT error FROM cells WHERE status = 'failed'").fetchone()
    assert "RuntimeError: disk on fire" in error

    monkeypatch.setattr("bench.runner.executors.run_cell", real)
    assert _run(data_root, out) == 0  # the failed cell is retried, the finished one kept
    assert {status for status, _, _ in _stored(out)} == {"done"}


def test_identical_variant_runs_once_and_gets_its_own_row(data_root, tmp_path, monkeypatch):
    # resnet18 under the original reference is already 3x3-only: fastflow == fastflow-3x3.
    seen = _count_cells(monkeypatch)
    out = tmp_path / "run"
    # four training images: a batch of 2, since the original reference drops incomplete ones
    methods = "fastflow,fastflow-3x3,fastflow-alt"
    assert _run(data_root, out, "--batch-size", "2", methods=methods) == 0
    assert sorted(seen) == [
        "fastflow-alt/resnet18/bottle/seed0",
        "fastflow-alt/resnet18/screw/seed0",
        "fastflow/resnet18/bottle/seed0",
        "fastflow/resnet18/screw/seed0",
    ]
    rows = {label: row for _, label, row in _stored(out)}
    assert len(rows) == 6
    same, twin = rows["fastflow/resnet18/bottle/seed0"], rows["fastflow-3x3/resnet18/bottle/seed0"]
    assert twin["method"] == "fastflow-3x3" and twin["image_auroc"] == same["image_auroc"]
    assert twin["cell_key"] != same["cell_key"]
    for row in (same, twin):  # each name gets its own saved maps for the gallery
        assert (out / "examples" / f"{row['cell_key']}.npz").is_file()
    assert rows["fastflow-alt/resnet18/bottle/seed0"]["settings"]["conv3x3_only"] is False


def test_unknown_method_is_one_clear_line(data_root, tmp_path, capsys):
    assert _run(data_root, tmp_path / "run", methods="fastflo") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: unknown method 'fastflo'; known: cflow, csflow, fastflow")


def test_unknown_category_is_one_clear_line(data_root, tmp_path, capsys):
    code = main(
        ["run", "--methods", "padim", "--dataset", "mvtec", "--data-root", str(data_root)]
        + ["--categories", "bottel", "--out", str(tmp_path / "run")]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: unknown mvtec category 'bottel'; known: bottle, screw"


def test_all_categories_are_checked_before_any_cell_runs(data_root, tmp_path, monkeypatch, capsys):
    seen = _count_cells(monkeypatch)
    shutil.rmtree(data_root / "screw" / "test")
    code = main(
        ["run", "--methods", "padim", "--dataset", "mvtec", "--data-root", str(data_root)]
        + ["--categories", "all", "--out", str(tmp_path / "run")]
    )
    assert code == 2 and seen == []
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"error: screw: no test folder under {data_root / 'screw'} (the mvtec layout has "
        "train/good/ and test/ in every category folder)"
    )


def test_eval_every_stores_each_epoch_and_leaves_the_final_row_alone(data_root: Path, tmp_path):
    import bench

    grid = dict(
        methods="fastflow",
        dataset="mvtec",
        data_root=str(data_root),
        categories="bottle",
        input_size=32,
        weights="random",
        workers=0,
        epochs=2,
        batch_size=2,  # FastFlow's original reference drops an incomplete last batch
        profile=False,
    )
    plain = bench.run(**grid, out=str(tmp_path / "plain")).results.iloc[0]
    result = bench.run(**grid, eval_every=1, out=str(tmp_path / "epochs"))
    row = result.results.iloc[0]
    history = json.loads(row["history"])
    assert [h["epoch"] for h in history] == [1, 2]
    for metric in ("image_auroc", "pixel_auroc", "aupro"):
        assert history[-1][metric] == row[metric] == plain[metric]  # evaluating moved nothing
    assert pd.isna(plain["history"])
    report = (result.folder / "report.md").read_text()
    assert "Best epoch on test (optimistic, as in the paper's code)" in report
    assert (result.folder / "figures" / "auroc_by_epoch.png").is_file()
    assert "auroc_by_epoch" not in (tmp_path / "plain" / "report.md").read_text()


def test_eval_every_in_the_unified_setting_keeps_a_history_per_category(data_root, tmp_path):
    import bench

    grid = dict(
        methods="fastflow",
        dataset="mvtec",
        data_root=str(data_root),
        categories="bottle,screw",
        setting="unified",
        input_size=32,
        weights="random",
        workers=0,
        epochs=2,
        batch_size=2,
        profile=False,
    )
    plain = bench.run(**grid, out=str(tmp_path / "plain")).results.set_index("category")
    rows = bench.run(**grid, eval_every=1, out=str(tmp_path / "epochs")).results
    rows = rows.set_index("category")
    for category in ("bottle", "screw"):
        history = json.loads(rows.loc[category, "history"])
        assert [h["epoch"] for h in history] == [1, 2]
        for metric in ("image_auroc", "pixel_auroc", "aupro"):
            final = rows.loc[category, metric]
            assert history[-1][metric] == final == plain.loc[category, metric]


def _evidence_scores(out: Path, key: str) -> np.ndarray:
    with np.load(out / EVIDENCE_FOLDER / f"{key}.npz") as stored:
        return stored["scores"]


def test_unified_fits_one_model_on_every_category_and_scores_each(data_root, tmp_path, monkeypatch):
    """One fit (one run of the cell function) gives a row per category, marked unified;
    its bottle scores equal those of a separate model trained on a category holding the
    same images as bottle and screw together."""
    both = data_root / "both"
    (both / "train" / "good").mkdir(parents=True)
    for i, image in enumerate(
        sorted((data_root / "bottle" / "train" / "good").iterdir())
        + sorted((data_root / "screw" / "train" / "good").iterdir())
    ):
        shutil.copy(image, both / "train" / "good" / f"{i:03d}.png")
    shutil.copytree(data_root / "bottle" / "test", both / "test")
    shutil.copytree(data_root / "bottle" / "ground_truth", both / "ground_truth")

    seen = _count_cells(monkeypatch)
    unified = tmp_path / "unified"
    assert _run(data_root, unified, "--setting", "unified", "--no-profile") == 0
    assert len(seen) == 1
    rows = pd.read_csv(unified / "results.csv")
    assert rows["category"].tolist() == ["bottle", "screw"]
    assert set(rows["setting"]) == {"unified"}
    assert set(rows["trained_on"]) == {"bottle,screw"}
    assert rows["n_train"].tolist() == [8, 8] and rows["n_test"].tolist() == [4, 4]
    assert rows["fit_seconds"].nunique() == 1 and rows["cell_key"].nunique() == 2

    merged = tmp_path / "merged"
    assert main(
        ["run", "--methods", "padim", "--dataset", "mvtec", "--data-root", str(data_root),
         "--categories", "both", "--input-size", "32", "--weights", "random", "--workers",
         "0", "--out", str(merged), "--no-profile"]
    ) == 0  # fmt: skip
    reference = pd.read_csv(merged / "results.csv").iloc[0]
    assert reference["setting"] == "separate" and pd.isna(reference["trained_on"])
    np.testing.assert_allclose(
        _evidence_scores(unified, rows["cell_key"][0]),
        _evidence_scores(merged, reference["cell_key"]),
        rtol=1e-5,
    )

    separate = tmp_path / "separate"
    assert _run(data_root, separate, "--no-profile") == 0
    assert set(pd.read_csv(separate / "results.csv")["cell_key"]).isdisjoint(rows["cell_key"])
    seen.clear()
    assert _run(data_root, unified, "--setting", "unified", "--no-profile") == 0
    assert seen == []  # resumed: both rows are there


def test_unified_refuses_per_category_settings(data_root, tmp_path, capsys):
    preset = tmp_path / "preset.yaml"
    preset.write_text("per_category:\n  screw: {padim.input_size: 64}\n")
    assert _run(data_root, tmp_path / "out", "--setting", "unified", "--preset", str(preset)) == 2
    err = capsys.readouterr().err
    assert "--setting unified" in err and "screw" in err
    assert _run(data_root, tmp_path / "out", "--setting", "both") == 2
    assert "--setting both: expected separate or unified" in capsys.readouterr().err
