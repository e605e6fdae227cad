"""`bench paper`: published numbers as data, and tables of paper / ours / delta per cell."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from bench.cli import main
from bench.errors import BenchError
from bench.paper.filled import fill_table, render_markdown
from bench.paper.grids import grid_configs
from bench.paper.published import METRICS, STATUSES, load_table, table_names
from bench.registry import DATASETS
from bench.runner.cell import Cell
from bench.runner.grid import expand_cells
from bench.runner.store import ResultStore

ISSUE_TABLES = {
    "fastflow-backbones",
    "fastflow-mvtec",
    "fastflow-btad",
    "fastflow-cifar10",
    "fastflow-ablation",
    "fastflow-complexity",
    "cflow-mvtec",
    "cflow-complexity",
    "padim-mvtec",
    "msflow-mvtec",
    "uflow-mvtec",
}


def _row(cell: Cell, pretrained: bool = True, **values: Any) -> dict[str, Any]:
    """A result row as run_cell writes it, with fixed metric values."""
    row = {
        "dataset": cell.dataset,
        "category": cell.category,
        "method": cell.method,
        "base_method": cell.base,
        "backbone": cell.backbone,
        "seed": cell.seed,
        "reference": cell.reference,
        "weights": f"{cell.backbone}.tv_in1k" if pretrained else "random(seed=0)",
        "pretrained": pretrained,
        "input": "resize 64x64 (bilinear)",
        "image_auroc": 0.9,
        "pixel_auroc": None if cell.dataset == "cifar10" else 0.95,
        "aupro": None if cell.dataset == "cifar10" else 0.8,
        "trainable_params": 5_000_000,
        "latency_e2e_ms": 40.0,
        "latency_head_ms": 5.0,
        "peak_memory_mb": 2048.0,
        "settings": cell.settings,
        "cell_key": cell.key,
    }
    row.update(values)
    return row


def _grid_cells(name: str, categories: list[str] | None = None, **overrides: Any) -> list[Cell]:
    """Every cell the table's grids would run (without touching any dataset files)."""
    table = load_table(name)
    cells = []
    for config in grid_configs(table, overrides, Path("unused")):
        listed = config.categories if config.categories not in (["all"], []) else None
        wanted = categories or listed or list(DATASETS.get(config.dataset).categories)
        cells += expand_cells(config, wanted)
    return cells


def _store(folder: Path, rows: list[dict[str, Any]]) -> Path:
    store = ResultStore(folder)
    for row in rows:
        cell = Cell(
            row["method"],
            row["base_method"],
            row["dataset"],
            row["category"],
            row["backbone"],
            row["seed"],
            row["reference"],
            "imagenet",
            {**row["settings"], "_key": row["cell_key"]},
        )
        store.put_result(cell, row)
    store.close()
    return folder


def _paper(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["paper", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_list_names_every_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _paper(["--list"], capsys)
    assert code == 0
    assert set(table_names()) >= ISSUE_TABLES
    for name in table_names():
        assert f"{name}: {load_table(name).title}" in out
    # cflow-mvtec: the paper's Table 3, all primary (its AUPRO printed in two columns)
    assert "published numbers: 96 P" in out
    assert out.startswith(
        "Published numbers by status: P primary, X cross-checked, S single secondary source "
        "(marked †), U doubtful (marked ‡).\n"
    )


@pytest.mark.parametrize("name", sorted(ISSUE_TABLES))
def test_every_table_renders_from_a_run_folder(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = load_table(name)
    rows = [_row(c) for c in _grid_cells(name)]
    code, out, _ = _paper([name, "--from", str(_store(tmp_path, rows))], capsys)
    assert code == 0
    assert out.startswith(f"**{table.title}**")
    assert "Each cell: paper / ours / Δ = ours − paper." in out
    assert "Not comparable" not in out
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + len(table.rows)
    for number in table.numbers.values():
        mark = {"S": "†", "U": "‡"}.get(number.status, "")
        assert f" {number.text}{mark} / " in out
    for status, legend in (("S", "† single secondary source"), ("U", "‡ doubtful")):
        used = any(n.status == status for n in table.numbers.values())
        assert (legend in out) == used
    assert (tmp_path / "paper" / f"{name}.md").read_text() in out
    assert (tmp_path / "paper" / f"{name}.csv").is_file()


def test_cells_show_published_ours_and_delta(tmp_path: Path) -> None:
    rows = [_row(c) for c in _grid_cells("fastflow-mvtec")]
    text = render_markdown(fill_table(load_table("fastflow-mvtec"), rows))
    assert "| carpet | 100.0† / 90.0 / -10.0 | 99.4 / 95.0 / -4.4 |" in text
    assert "| **mean** | 99.4 / 90.0 / -9.4 | 98.5 / 95.0 / -3.5 |" in text
    btad = render_markdown(
        fill_table(load_table("fastflow-btad"), [_row(c) for c in _grid_cells("fastflow-btad")])
    )
    assert "| 01 | – / 95.0 / – |" in btad  # the paper's number was not found: never invented


def test_missing_runs_and_partial_means(tmp_path: Path) -> None:
    rows = [
        _row(c) for c in _grid_cells("padim-mvtec", ["carpet", "bottle"], backbones=["resnet18"])
    ]
    text = render_markdown(fill_table(load_table("padim-mvtec"), rows))
    # WR50 was not run: published only; R18 ran on two of fifteen categories.
    assert (
        "| carpet | – / – / – | 99.1 / – / – | 96.2 / – / – | – / 90.0 / – | – / 95.0 / – |" in text
    )
    assert (
        "| **mean** | 95.3 / – / – | 97.5 / – / – | 92.1 / – / – | – / 90.0* / – | 96.7† / 95.0* / – |"
        in text
    )
    assert "| **textures mean** |" in text and "93.2† / – / –" in text
    assert (
        "* our mean covers fewer categories than the paper's (textures mean over 1 of 5; "
        "objects mean over 1 of 10; mean over 2 of 15); no Δ." in text
    )


def test_cost_columns_average_what_ran_and_missing_costs_stay_missing() -> None:
    cells = _grid_cells("cflow-complexity")
    rows = [_row(c, latency_e2e_ms=None if c.method == "cflow" else 200.0) for c in cells]
    text = render_markdown(fill_table(load_table("cflow-complexity"), rows))
    assert "| CFLOW-AD (encoder not stated) | 27† / – / – | – / – / – |" in text
    assert (
        "| PaDiM-R18-Rd100 | – / 5.0 / – | 230† / 200.0 / -30.0 | – / 5.00 / – | – / – / – "
        "| – / 2.00 / – |" in text  # no model_bytes in these rows: the stored-model column is empty
    )
    assert (
        "| CFLOW-AD ResNet18 | – / – / – | – / – / – | – / 5.00 / – | – / – / – | – / 2.00 / – |"
        in text
    )


def test_random_weights_are_called_not_comparable(tmp_path: Path) -> None:
    rows = [_row(c, pretrained=False) for c in _grid_cells("fastflow-backbones", ["bottle"])]
    text = render_markdown(fill_table(load_table("fastflow-backbones"), rows))
    assert (
        "**Not comparable with the paper: the backbone weights were not ImageNet (random(seed=0)).**"
        in text
    )


def test_ablation_rows_follow_the_kernel_setting() -> None:
    cells = _grid_cells("fastflow-ablation", backbones=["resnet18"])
    assert {(c.method, c.settings["conv3x3_only"]) for c in cells} == {
        ("fastflow-alt", False),
        ("fastflow-3x3", True),
    }
    rows = [
        _row(c, trainable_params=2_600_000 if not c.settings["conv3x3_only"] else 4_700_000)
        for c in cells
    ]
    text = render_markdown(fill_table(load_table("fastflow-ablation"), rows))
    assert "| ResNet18 alternating | – / 90.0 / – | – / 95.0 / – | 2.7† / 2.60 / -0.10 |" in text
    assert "| ResNet18 3x3 only | – / 90.0 / – | – / 95.0 / – | 4.9 / 4.70 / -0.20 |" in text


def test_two_configurations_of_one_cell_are_refused() -> None:
    cells = _grid_cells("fastflow-mvtec", ["carpet"])
    rows = [
        _row(cells[0]),
        _row(dataclasses.replace(cells[0], settings={**cells[0].settings, "epochs": 1})),
    ]
    with pytest.raises(BenchError, match="2 results for carpet seed 0 .*differ in .*settings"):
        fill_table(load_table("fastflow-mvtec"), rows)


def test_references_are_never_mixed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cells = _grid_cells("fastflow-mvtec", ["carpet"])
    rows = [
        _row(cells[0]),
        _row(dataclasses.replace(cells[0], reference="anomalib"), image_auroc=0.5),
    ]
    folder = _store(tmp_path, rows)
    code, _, err = _paper(["fastflow-mvtec", "--from", str(folder)], capsys)
    assert code == 2 and "references anomalib, original; choose one with --reference" in err
    code, out, _ = _paper(
        ["fastflow-mvtec", "--from", str(folder), "--reference", "anomalib"], capsys
    )
    assert code == 0 and "| carpet | 100.0† / 50.0 / -50.0 |" in out and "reference anomalib" in out


def test_one_backbone_tables_take_a_substitute(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cells = _grid_cells("fastflow-mvtec", ["carpet"], backbones=["resnet18"])
    assert {c.backbone for c in cells} == {"resnet18"}
    folder = _store(tmp_path, [_row(c) for c in cells])
    code, out, _ = _paper(["fastflow-mvtec", "--from", str(folder)], capsys)
    assert "| carpet | 100.0† / – / – |" in out  # CaiT rows only, by default
    code, out, _ = _paper(
        ["fastflow-mvtec", "--from", str(folder), "--backbone", "resnet18"], capsys
    )
    assert code == 0 and "| carpet | 100.0† / 90.0 / -10.0 |" in out
    assert (
        "Ours use backbone resnet18 where the paper used cait_m48_448: not the same model." in out
    )
    code, _, err = _paper(["padim-mvtec", "--from", str(folder), "--backbone", "vgg16"], capsys)
    assert code == 2 and "give a subset of them" in err


def test_bad_requests_get_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _paper(["fastflow-mvtec", "--weights", "random"], capsys)
    assert (
        code == 2
        and "--allow-random-weights" in err
        and not (Path("results") / "paper-fastflow-mvtec").exists()
    )
    code, _, err = _paper(["fastflow-mvtec", "--from", str(tmp_path), "--epochs", "1"], capsys)
    assert code == 2 and "--epochs: --from reads a finished run" in err
    code, _, err = _paper(["no-such-table"], capsys)
    assert code == 2 and "unknown paper table 'no-such-table'; known: cflow-complexity" in err
    code, _, err = _paper([], capsys)
    assert code == 2 and "bench paper --list" in err


def test_grid_overrides_merge_with_the_table_grid() -> None:
    table = load_table("fastflow-ablation")
    grid = {**table.grids[0], "set": {"fastflow": {"conv3x3_only": False}}}
    table = dataclasses.replace(table, grids=[table.grids[0], grid])
    configs = grid_configs(
        table,
        {"backbones": ["resnet18"], "set": {"fastflow": {"epochs": "1"}}, "epochs": 2},
        Path("x"),
    )
    assert [c.methods for c in configs] == [["fastflow-3x3", "fastflow-alt"]] * 2
    assert all(c.backbones == ["resnet18"] and c.epochs == 2 and c.out == "x" for c in configs)
    assert configs[0].set == {"fastflow": {"epochs": "1"}}
    assert configs[1].set == {"fastflow": {"conv3x3_only": False, "epochs": "1"}}


@pytest.mark.parametrize("name", sorted(ISSUE_TABLES))
def test_every_number_has_a_status_and_a_listed_source(name: str) -> None:
    table = load_table(name)
    for (row, column), number in table.numbers.items():
        assert number.status in STATUSES
        for source in number.source.split("; "):
            assert source in table.sources, f"{name} {row}/{column}: source {source} not listed"
    assert table.dataset in DATASETS.names()


def test_paper_runs_its_grid_on_a_small_real_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The MVTec-layout synthetic folder read as MVTec: a category the paper lacks gets a row."""
    data = DATASETS.get("synthetic")(None).folder()
    args = ["fastflow-mvtec", "--data-root", str(data), "--categories", "brick"]
    args += ["--backbone", "resnet18", "--weights", "random", "--allow-random-weights"]
    args += ["--epochs", "1", "--input-size", "64", "--out", str(tmp_path)]
    code, out, _ = _paper(args, capsys)
    assert code == 0
    assert "| carpet | 100.0† / – / – | 99.4 / – / – |" in out
    brick = next(line for line in out.splitlines() if line.startswith("| brick |"))
    assert (
        brick.count(" / ") == 4 and brick.startswith("| brick | – / ") and "/ – / – |" not in brick
    )
    assert out.index("| zipper |") < out.index("| brick |") < out.index("| **mean** |")
    assert "Not comparable with the paper" in out and "Ours use backbone resnet18" in out
    assert (tmp_path / "paper" / "fastflow-mvtec.md").is_file()
    report = (tmp_path / "report.md").read_text()
    assert "[paper/fastflow-mvtec.md](paper/fastflow-mvtec.md)" in report
    assert (tmp_path / "figures" / "gallery_brick.png").is_file()


def test_cflow_mvtec_runs_each_wrn50_category_at_its_paper_input_size() -> None:
    sizes = {(c.backbone, c.category): c.settings["input_size"] for c in _grid_cells("cflow-mvtec")}
    assert sizes[("wide_resnet50_2", "transistor")] == 128
    assert sizes[("wide_resnet50_2", "pill")] == 256
    assert sizes[("wide_resnet50_2", "bottle")] == 512
    assert {s for (b, _), s in sizes.items() if b == "resnet18"} == {256}
    assert len({s for (b, _), s in sizes.items() if b == "wide_resnet50_2"}) == 3


@pytest.mark.parametrize("name", sorted(ISSUE_TABLES))
def test_rows_of_ours_name_registered_methods(name: str) -> None:
    """A row that can hold our numbers matches a method this harness has; rows of methods
    it lacks (PatchCore, SPADE, CFLOW-AD on DeiT) are published-only."""
    from bench.registry import METHODS

    table = load_table(name)
    methods = {m for grid in table.grids for m in grid["methods"]}
    backbones = set(table.backbones)
    for row in table.rows:
        if not row.ours:
            assert not row.match
            continue
        method = row.match.get("method", row.match.get("base_method"))
        if method is not None:
            assert method in METHODS.names(), (name, row.id)
            assert method in methods or method in {METHODS.entry(m).meta["base"] for m in methods}
        if "backbone" in row.match:
            assert row.match["backbone"] in backbones, (name, row.id)


@pytest.mark.parametrize("name", sorted(ISSUE_TABLES))
def test_notes_are_sentences_that_stand_alone(name: str) -> None:
    """Notes are shown to whoever clones the repository: plain sentences, pointing at
    nothing outside it."""
    table = load_table(name)
    for note in table.notes:
        assert isinstance(note, str)
        assert "paper_numbers" not in note and "method_spec" not in note
    if table.dataset == "mvtec" and any(c.metric == "image_auroc" for c in table.columns):
        assert any(note.startswith("Image score:") for note in table.notes), name


def test_a_number_printed_twice_has_one_tag() -> None:
    """FastFlow's pixel AUROC per backbone appears in the backbone and complexity tables."""
    backbones, complexity = load_table("fastflow-backbones"), load_table("fastflow-complexity")
    for row, twin in (("deit", "deit-fastflow"), ("resnet18", "r18-fastflow")):
        one, other = backbones.published(row, "pixel"), complexity.published(twin, "pixel")
        assert (one.text, one.status) == (other.text, other.status) == (one.text, "X")


def test_padim_memory_column_is_the_stored_gaussians_beside_process_peak() -> None:
    table = load_table("cflow-complexity")
    metrics = {c.id: c.metric for c in table.columns}
    assert metrics["memory"] == "model_gb" and metrics["peak"] == "peak_memory_gb"
    row = {"model_bytes": 3_790_000_000, "peak_memory_mb": 2048.0}
    assert METRICS["model_gb"].value(row) == pytest.approx(3.79)
    assert METRICS["peak_memory_gb"].value(row) == pytest.approx(2.0)


def test_cflow_table_compares_its_aupro_with_the_authors_routine_too() -> None:
    table = load_table("cflow-mvtec")
    metrics = {c.id: c.metric for c in table.columns}
    assert metrics["wrn_pro"] == "aupro" and metrics["wrn_pro_cflow"] == "aupro_cflow"
    for row in table.rows:
        official, routine = (
            table.published(row.id, "wrn_pro"),
            table.published(row.id, "wrn_pro_cflow"),
        )
        assert (official is None) == (routine is None)
        assert official is None or official.text == routine.text
    assert any("CFLOW-AD routine" in note for note in table.notes)


def test_a_paper_run_where_no_cell_finished_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # CFLOW-AD's reflect padding cannot take 32 px: every cell fails before building anything.
    data = DATASETS.get("synthetic")(None).folder()
    args = ["cflow-mvtec", "--data-root", str(data), "--categories", "brick", "--input-size"]
    args += ["32", "--weights", "random", "--allow-random-weights", "--out", str(tmp_path)]
    code, out, err = _paper(args, capsys)
    assert code == 1 and out == ""
    assert "failed: cflow/resnet18/brick/seed0: cflow: --input-size 32 leaves layer4" in err
    assert err.strip().splitlines()[-1] == (
        "no cell finished, so table cflow-mvtec has none of ours to compare; fix the failures "
        f"above and rerun (run folder: {tmp_path})"
    )
    assert "Traceback" not in err and not (tmp_path / "report.md").exists()


def test_paper_checks_the_data_layout_before_any_cell_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "data" / "bottle" / "train").mkdir(parents=True)  # no train/good, no test
    args = ["padim-mvtec", "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "run")]
    code, _, err = _paper(args, capsys)
    assert code == 2 and "error: bottle: no train/good folder under" in err
    assert not (tmp_path / "run").exists()
