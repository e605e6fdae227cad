"""Executor choice and Ray options, checked without starting Ray (or having it installed)."""

from __future__ import annotations

import socket
import sys
from types import SimpleNamespace

import pytest

from bench.cli import main
from bench.errors import BenchError
from bench.runner.config import RunConfig
from bench.runner.ray_executor import RayExecutor, check_reachable, describe_ray_failure


def test_ray_executor_without_ray_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail
    out = tmp_path / "run"
    assert main(["run", "--methods", "padim", "--executor", "ray", "--out", str(out)]) == 2
    assert 'pip install "flowad-bench[ray]"' in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"executor": "dask"}, r"--executor dask: expected one of local, ray"),
        ({"ray_address": "head:6379"}, r"--ray-address head:6379: add --executor ray"),
        ({"executor": "ray", "cpus_per_cell": 0}, r"--cpus-per-cell 0: must be positive"),
        ({"executor": "ray", "gpus_per_cell": -1}, r"--gpus-per-cell -1: must be 0 or more"),
        ({"executor": "ray", "retries": -1}, r"--retries -1: must be 0 or more"),
        ({"executor": "ray", "device": "cuda:1"}, r"--device cuda:1: with --executor ray"),
        ({"executor": "ray", "device": "cuda", "gpus_per_cell": 0}, r"a cell would see no GPU"),
    ],
)
def test_bad_executor_options_are_named(changes, message):
    config = RunConfig(methods=["padim"], **changes)
    with pytest.raises(BenchError, match=message):
        config.validate()


def _cluster(*nodes: dict[str, float]) -> SimpleNamespace:
    """The two calls RayExecutor makes to size its tasks, answered for a fixed cluster."""
    totals = {k: sum(n.get(k, 0) for n in nodes) for k in ("CPU", "GPU")}
    return SimpleNamespace(
        nodes=lambda: [{"Alive": True, "Resources": n} for n in nodes],
        cluster_resources=lambda: totals,
    )


def test_one_gpu_per_cell_where_the_cluster_has_gpus():
    gpu_cluster, cpu_cluster = _cluster({"CPU": 8, "GPU": 2}), _cluster({"CPU": 8})
    assert RayExecutor().gpus(gpu_cluster, "auto") == 1
    assert RayExecutor().gpus(gpu_cluster, "cpu") == 0
    assert RayExecutor().gpus(cpu_cluster, "auto") == 0
    assert RayExecutor(gpus_per_cell=0.5).gpus(gpu_cluster, "auto") == 0.5
    with pytest.raises(BenchError, match="--device cuda: the Ray cluster has no GPUs"):
        RayExecutor().gpus(cpu_cluster, "cuda")


def test_a_cell_no_node_can_hold_is_refused_at_once():
    cluster = _cluster({"CPU": 4, "GPU": 1}, {"CPU": 16})
    RayExecutor(cpus_per_cell=4).check_feasible(cluster, gpus=1)
    RayExecutor(cpus_per_cell=16).check_feasible(cluster, gpus=0)
    with pytest.raises(BenchError, match=r"--cpus-per-cell 8 --gpus-per-cell 1: no Ray node"):
        RayExecutor(cpus_per_cell=8).check_feasible(cluster, gpus=1)


def test_threads_and_loader_workers_follow_the_cells_cpus():
    assert (RayExecutor().threads, RayExecutor().workers) == (1, 0)
    assert (RayExecutor(cpus_per_cell=8).threads, RayExecutor(cpus_per_cell=8).workers) == (8, 4)
    assert RayExecutor(cpus_per_cell=8, threads=2, workers=1).threads == 2


def test_unreachable_ray_address_fails_fast():
    with socket.socket() as server:  # a port that was free a moment ago: nothing listens
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
    with pytest.raises(BenchError, match=rf"--ray-address 127.0.0.1:{port}: nothing answers"):
        check_reachable(f"127.0.0.1:{port}", timeout=2)
    check_reachable("auto")


def test_ray_failures_read_as_one_line():
    class TaskError(Exception):
        pass

    class WorkerCrashedError(Exception):
        pass

    not_installed = TaskError(
        "\x1b[36mray::run_on_worker()\x1b[39m (pid=7, ip=10.0.0.2)\n"
        "RuntimeError: The remote function failed to import on the worker.\n"
        "ModuleNotFoundError: No module named 'bench.ray_executor'"
    )
    assert describe_ray_failure(not_installed, TaskError, 1) == (
        "on the Ray worker: ModuleNotFoundError: No module named 'bench.ray_executor' "
        "(is the same flowad-bench installed on every Ray node?)"
    )
    crashed = WorkerCrashedError("The worker died unexpectedly.\nCheck the logs.")
    assert describe_ray_failure(crashed, TaskError, 2) == (
        "WorkerCrashedError after 2 Ray retries: The worker died unexpectedly."
    )
