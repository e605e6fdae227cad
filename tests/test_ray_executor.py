"""``--executor ray`` on a local two-CPU Ray instance: same rows as local, faults, Ctrl-C."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from bench.cli import main
from bench.registry import METHODS
from bench.runner.store import ResultStore

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent

# Four cells, a few seconds each on two cores. One thread and no loader workers, so the
# local run (this process) and the Ray workers compute in the same order.
GRID = [
    "run",
    "--methods",
    "padim,fastflow",
    "--categories",
    "brick,washer",
    "--input-size",
    "64",
    "--weights",
    "random",
    "--epochs",
    "1",
    "--threads",
    "1",
    "--workers",
    "0",
]

# Measured costs differ from run to run; every other column must match exactly.
MEASURED = re.compile(r"(_seconds|_ms|_ms_p95|_ips|_per_epoch)$|^peak_memory_mb$")


@pytest.fixture(scope="module", autouse=True)
def _shutdown_ray():
    yield
    ray.shutdown()


@pytest.fixture
def local_ray():
    """A small shared Ray instance whose workers can import tests/killer_plugin.py."""
    if not ray.is_initialized():
        path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
        ray.init(
            address="local",
            num_cpus=2,
            num_gpus=0,
            object_store_memory=100 * 2**20,
            include_dashboard=False,
            runtime_env={"env_vars": {"PYTHONPATH": path}},
        )
    return ray


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """``--threads 1`` sets this process's torch threads; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _rows(folder: Path) -> dict[str, dict]:
    store = ResultStore.open_existing(folder)
    try:
        return {row["cell_key"]: row for row in store.rows()}
    finally:
        store.close()


def _unmeasured(row: dict) -> dict:
    return {k: v for k, v in row.items() if not MEASURED.search(k)}


@pytest.mark.parametrize("setting", ["separate", "unified"])
def test_ray_rows_equal_local_rows(local_ray, tmp_path, capsys, setting):
    grid = [*GRID, "--setting", setting]
    assert main([*grid, "--out", str(tmp_path / "local")]) == 0
    assert main([*grid, "--executor", "ray", "--out", str(tmp_path / "ray")]) == 0
    local, remote = _rows(tmp_path / "local"), _rows(tmp_path / "ray")
    assert len(local) == 4 and local.keys() == remote.keys()
    for key, row in local.items():
        assert _unmeasured(remote[key]) == _unmeasured(row)
        assert remote[key]["fit_seconds"] > 0
        assert row["setting"] == setting
    if setting == "unified":  # one fit per method answers for both categories
        for method in ("padim", "fastflow"):
            fits = {r["fit_seconds"] for r in remote.values() if r["method"] == method}
            assert len(fits) == 1
    assert main([*grid, "--executor", "ray", "--out", str(tmp_path / "ray")]) == 0
    assert "4 of 4 cells already done" in capsys.readouterr().out


@pytest.fixture
def worker_killer():
    import killer_plugin

    METHODS.add(
        killer_plugin.NAME, killer_plugin.WorkerKiller, base=killer_plugin.NAME, settings={}
    )
    yield killer_plugin.NAME
    METHODS._entries.pop(killer_plugin.NAME, None)  # other tests run every registered method


def test_dead_worker_is_retried_then_recorded_as_failed(local_ray, worker_killer, tmp_path, capsys):
    marker = tmp_path / "attempts.txt"
    code = main(
        [
            *GRID,
            "--methods",
            f"padim,{worker_killer}",
            "--set",
            f"{worker_killer}.marker={marker}",
            "--executor",
            "ray",
            "--retries",
            "1",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert code == 1
    rows = _rows(tmp_path / "run")
    assert sorted((r["method"], r["category"]) for r in rows.values()) == [
        ("padim", "brick"),
        ("padim", "washer"),
    ]
    store = ResultStore.open_existing(tmp_path / "run")
    failures = dict(store.failures())
    store.close()
    assert set(failures) == {f"{worker_killer}/resnet18/{c}/seed0" for c in ("brick", "washer")}
    assert all("WorkerCrashedError" in error for error in failures.values())
    pids = marker.read_text().split()
    assert len(pids) == 4 and len(set(pids)) == 4  # two cells, each tried twice
    assert "2 of 4 cells failed" in capsys.readouterr().err


def test_ctrl_c_keeps_finished_rows_and_exits_non_zero(local_ray, tmp_path, monkeypatch):
    grid = [*GRID, "--methods", "padim", "--categories", "brick", "--seeds", "0,1,2,3"]
    grid += ["--executor", "ray", "--out", str(tmp_path / "run")]
    put_result = ResultStore.put_result

    def interrupted(self, cell, row):  # Ctrl-C right after the first row is stored
        put_result(self, cell, row)
        monkeypatch.setattr(ResultStore, "put_result", put_result)
        raise KeyboardInterrupt

    monkeypatch.setattr(ResultStore, "put_result", interrupted)
    assert main(grid) == 130
    finished = _rows(tmp_path / "run")
    assert 1 <= len(finished) < 4  # two cells were still queued when the first one ended
    assert main(grid) == 0
    assert len(_rows(tmp_path / "run")) == 4


def test_local_ray_instance_is_started_and_shut_down(tmp_path):
    if ray.is_initialized():
        ray.shutdown()
    grid = [*GRID, "--methods", "padim", "--categories", "brick", "--executor", "ray"]
    assert main([*grid, "--out", str(tmp_path / "run")]) == 0
    assert not ray.is_initialized()
    assert len(_rows(tmp_path / "run")) == 1
