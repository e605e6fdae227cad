"""Cost figures (bench/profiling.py, bench speed): counts, FLOPs, timings, memory, rows."""

from __future__ import annotations

import csv
import dataclasses
import math
import mmap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from bench import cli, profiling
from bench.datasets.base import Dataset, Sample
from bench.profiling import (
    PeakMemory,
    ProfileSettings,
    count_flops,
    percentile,
    profile_inference,
    train_seconds_per_epoch,
)
from bench.registry import DATASETS
from bench.report.speed_table import to_markdown
from bench.runner.cell import Cell, Environment, build_method, run_cell
from bench.runner.config import RunConfig
from bench.runner.grid import resolve_settings

TIMED = (
    "latency_head_ms",
    "latency_e2e_ms",
    "throughput_head_ips",
    "throughput_e2e_ips",
)
AGREED = (
    "params_head",
    "params_backbone",
    "flops_head",
    "flops_backbone",
    "latency_head_ms",
    "latency_head_ms_p95",
    "latency_e2e_ms",
    "latency_e2e_ms_p95",
    "throughput_head_ips",
    "throughput_e2e_ips",
    "throughput_batch",
    "peak_memory_mb",
    "peak_memory_kind",
    "train_seconds_per_epoch",
    "fit_seconds",
    "test_seconds",
    "feature_seconds",
    "device",
    "threads",
    "dtype",
)
QUICK = ProfileSettings(repeats=3, warmup=1, throughput_batch=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def _built(method: str, size: int = 64, **settings: str):
    config = RunConfig(methods=[method], input_size=size, weights="random", set={method: settings})
    base, resolved = resolve_settings(method, "resnet18", config)
    cell = Cell(method, base, "none", "none", "resnet18", 0, "original", "random", {})
    cell = dataclasses.replace(cell, settings=dataclasses.asdict(resolved))
    return build_method(cell, Environment(data_root=None, progress=False))


@pytest.mark.parametrize("method", ["fastflow", "cflow"])
def test_head_parameters_exclude_freia_permutations(method: str) -> None:
    built, extractor, _ = (
        _built(method, flow_steps="2")
        if method == "fastflow"
        else _built(method, coupling_blocks="2", condition_vector="8")
    )
    model = built.model
    fixed = sum(p.numel() for n, p in model.named_parameters() if "w_perm" in n)
    assert fixed > 0 and not any(
        p.requires_grad for n, p in model.named_parameters() if "w_perm" in n
    )
    everything = sum(p.numel() for p in model.parameters())
    row = profile_inference(built, extractor, QUICK)
    assert row["params_head"] == everything - fixed


def test_backbone_parameters_equal_timm() -> None:
    built, extractor, _ = _built("fastflow", flow_steps="2")
    reference = timm.create_model("resnet18", features_only=True, out_indices=(1, 2, 3))
    assert profile_inference(built, extractor, QUICK)["params_backbone"] == sum(
        p.numel() for p in reference.parameters()
    )


def test_flops_of_known_conv_linear_and_attention_are_exact() -> None:
    conv = nn.Conv2d(8, 4, 3, padding=1)
    assert count_flops(lambda: conv(torch.zeros(2, 8, 10, 10))) == 2 * 2 * 8 * 4 * 9 * 10 * 10
    linear = nn.Linear(10, 6)
    assert count_flops(lambda: linear(torch.zeros(3, 10))) == 2 * 3 * 10 * 6
    q, k = torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 7, 8)
    attention = count_flops(lambda: F.scaled_dot_product_attention(q, k, k))
    assert attention == 2 * (2 * 1 * 2 * 5 * 7 * 8)  # Q K^T and (softmax) V


def test_flop_counter_misses_what_the_docs_say() -> None:
    x = torch.rand(1, 4, 8, 8)
    missed = [
        lambda: torch.exp(x),
        lambda: torch.tanh(x),
        lambda: F.softplus(x),
        lambda: F.layer_norm(x, x.shape[1:]),
        lambda: F.interpolate(x, size=(16, 16), mode="bilinear"),
        lambda: x.index_select(1, torch.tensor([3, 2, 1, 0])),
    ]
    assert [count_flops(fn) for fn in missed] == [0] * len(missed)


@pytest.mark.parametrize("method", ["fastflow", "padim"])
def test_profile_fields_present_and_positive(method: str) -> None:
    built, extractor, _ = _built(method, flow_steps="2") if method == "fastflow" else _built(method)
    built.init_untrained()
    row = profile_inference(built, extractor, QUICK)
    for key in TIMED:
        assert row[key] > 0 and math.isfinite(row[key])
    assert row["latency_head_ms"] <= row["latency_head_ms_p95"]
    assert row["latency_e2e_ms"] <= row["latency_e2e_ms_p95"]
    assert row["flops_backbone"] > 0 and row["flops_head"] > 0
    assert row["throughput_batch"] == 2 and row["dtype"] == "float32"


def test_percentile_matches_numpy() -> None:
    values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0]
    for q in (0, 50, 95, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_train_seconds_per_pass_counts_epochs_run_and_sub_epochs() -> None:
    cflow = SimpleNamespace(settings=SimpleNamespace(epochs=25, sub_epochs=8), history=[1.0] * 2)
    assert train_seconds_per_epoch(cflow, 32.0) == 2.0
    stopped = SimpleNamespace(settings=SimpleNamespace(epochs=500), history=[1.0] * 4)
    assert train_seconds_per_epoch(stopped, 8.0) == 2.0
    assert train_seconds_per_epoch(SimpleNamespace(settings=SimpleNamespace()), 8.0) is None


def test_peak_rss_covers_the_span_only() -> None:
    peak = PeakMemory(torch.device("cpu"))
    before = peak.read()["peak_memory_mb"]
    with mmap.mmap(-1, 64 * 2**20) as block:  # fresh pages, whatever malloc holds
        np.frombuffer(block, dtype=np.uint8)[:] = 1
    after = peak.read()
    assert after["peak_memory_kind"] == "cpu_peak_rss"
    if after["peak_memory_scope"] == "span":
        assert after["peak_memory_mb"] >= before + 60


class _Tiny(Dataset):
    """Four random train and four test images in memory, no masks."""

    name = "profiling-tiny"
    categories = ("noise",)
    has_masks = False

    def _images(self, n: int, seed: int, labels: list[int]) -> list[Sample]:
        rng = np.random.default_rng(seed)
        return [
            Sample(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), label, None, "x", f"{i}")
            for i, label in enumerate(labels[:n])
        ]

    def train(self, category: str) -> list[Sample]:
        return self._images(4, 0, [0] * 4)

    def test(self, category: str) -> list[Sample]:
        return self._images(4, 1, [0, 0, 1, 1])


DATASETS.add(_Tiny.name, _Tiny)


def _cell(method: str, **settings: str) -> Cell:
    config = RunConfig(methods=[method], input_size=64, epochs=1, set={method: settings})
    base, resolved = resolve_settings(method, "resnet18", config)
    return Cell(
        method, base, _Tiny.name, "noise", "resnet18", 0, "original", "random",
        dataclasses.asdict(resolved),
    )  # fmt: skip


def test_run_cell_row_has_every_agreed_cost_column() -> None:
    env = Environment(data_root=None, progress=False, profile=QUICK)
    [row] = run_cell(_cell("fastflow", flow_steps="2", batch_size="2"), env)
    missing = [key for key in AGREED if key not in row]
    assert not missing
    assert row["train_seconds_per_epoch"] == pytest.approx(row["fit_seconds"])
    assert row["params_head"] == row["trainable_params"] > 0
    assert row["peak_memory_mb"] > 0 and row["threads"] == torch.get_num_threads()


def test_run_cell_without_profile_keeps_free_figures_only() -> None:
    env = Environment(data_root=None, progress=False, profile=None)
    [row] = run_cell(_cell("padim"), env)
    assert row["train_seconds_per_epoch"] is None and row["params_head"] == 0
    assert row["params_backbone"] > 0 and row["peak_memory_mb"] > 0
    # every column exists in every row (one schema); these stay empty, never 0
    assert all(row[key] is None for key in (*TIMED, "flops_head", "flops_backbone"))


def test_failed_profile_keeps_the_cell_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(profiling, "profile_inference", out_of_memory)
    env = Environment(data_root=None, progress=False, profile=QUICK)
    with pytest.warns(UserWarning, match="profiling failed"):
        [row] = run_cell(_cell("padim"), env)
    assert (
        row["profile_error"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    )
    assert row["image_auroc"] is not None and row["latency_e2e_ms"] is None


def test_bench_speed_prints_and_writes_the_table_without_a_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("FLOWAD_CACHE", str(tmp_path / "cache"))

    def no_dataset(name: str):
        raise AssertionError(f"bench speed touched dataset {name}")

    monkeypatch.setattr(DATASETS, "get", no_dataset)
    out = tmp_path / "speed.csv"
    argv = ["speed", "--methods", "fastflow,padim", "--backbone", "resnet18", "--input-size"]
    argv += ["64", "--repeats", "2", "--throughput-batch", "2", "--device", "cpu"]
    argv += ["--set", "fastflow.flow_steps=2", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "head ms med / p95" in printed and "fastflow" in printed and "padim" in printed
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["method"] for r in rows] == ["fastflow", "padim"]
    assert rows[1]["model_input"] == "56x56"  # PaDiM original crops 0.875 of the input
    for row in rows:
        assert float(row["latency_e2e_ms"]) <= float(row["latency_e2e_ms_p95"])
        assert row["weights"].startswith("random")
        flops = float(row["flops_head"]) + float(row["flops_backbone"])
        achieved = flops * float(row["throughput_e2e_ips"]) / 1e9
        assert float(row["achieved_gflops"]) == pytest.approx(achieved)
        assert float(row["fraction_of_peak"]) == pytest.approx(achieved / float(row["peak_gflops"]))
    assert "e2e GFLOP/s" in printed and "% of peak" in printed


def test_bench_speed_rejects_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["speed", "--methods", "fastflow", "--repeats", "0"]) == 2
    assert (
        "--profile-repeats (bench speed: --repeats) 0: give at least 1" in capsys.readouterr().err
    )
    assert cli.main(["speed", "--methods", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert cli.main(["speed", "--methods", "fastflow", "--out", str(tmp_path / "t.txt")]) == 2
    assert "t.txt: expected a .csv or .md file name" in capsys.readouterr().err
    assert not (tmp_path / "t.txt").exists()


def test_markdown_table_shows_scaled_figures_and_dashes_for_missing_ones() -> None:
    row = {
        "method": "fastflow", "backbone": "resnet18", "model_input": "256x256",
        "params_head": 4_650_000, "params_backbone": 2_780_000, "flops_head": 2.5e9,
        "flops_backbone": None, "latency_head_ms": 4.0, "latency_head_ms_p95": 5.25,
        "latency_e2e_ms": 9.0, "latency_e2e_ms_p95": 11.0, "throughput_head_ips": 250.0,
        "throughput_e2e_ips": 100.0, "peak_memory_mb": 812.4, "device": "cpu", "threads": 2,
        "dtype": "float32", "reference": "original", "weights": "random(seed=0)",
        "peak_memory_kind": "cpu_peak_rss",
    }  # fmt: skip
    text = to_markdown([row], QUICK)
    assert "| fastflow | resnet18 | 256x256 | 4.65 | 2.78 | 2.5 | – | 4.0 / 5.2 |" in text
    assert "batch 2: median of 1 call." in text


def test_bench_speed_reports_a_failing_method_and_profiles_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from bench.methods.fastflow import FastFlow

    def broken(self) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(FastFlow, "init_untrained", broken)
    out = tmp_path / "speed.csv"
    argv = ["speed", "--methods", "fastflow,padim", "--backbone", "resnet18", "--input-size"]
    argv += [
        "64",
        "--repeats",
        "2",
        "--throughput-batch",
        "2",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    assert "FAILED fastflow / resnet18: boom" in captured.err
    assert "profiled padim / resnet18" in captured.err
    with out.open() as handle:
        rows = {r["method"]: r for r in csv.DictReader(handle)}
    assert rows["fastflow"]["error"] == "boom" and rows["fastflow"]["latency_e2e_ms"] == ""
    assert float(rows["padim"]["latency_e2e_ms"]) > 0


def test_peak_probe_is_measured_once_per_machine(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FLOWAD_CACHE", str(tmp_path))
    first = profiling.peak_gflops(torch.device("cpu"), seconds=0.05, size=128)
    assert first > 0 and (tmp_path / "peak_gflops.json").is_file()
    monkeypatch.setattr(torch, "randn", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    assert profiling.peak_gflops(torch.device("cpu"), seconds=0.05, size=128) == first


def test_speed_caption_counts_calls_in_words() -> None:
    from bench.report.speed_table import caption

    row = {"device": "cpu", "threads": 2, "dtype": "float32", "reference": "original",
           "weights": "random(seed=0)", "peak_memory_kind": "rss"}  # fmt: skip
    text = caption([row], ProfileSettings(repeats=1, warmup=0))
    assert "median / p95 of 1 call after 0 warm-up" in text
    assert "median of 1 call." in text
    assert "median / p95 of 20 calls" in caption([row], ProfileSettings())
