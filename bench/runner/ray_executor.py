"""``--executor ray``: each cell is one Ray task; the driver alone writes the results store.

A task receives its frozen cell and the environment (a few hundred bytes) and returns one
row, so nothing large goes through Ray's object store: workers read images from
``--data-root`` as they see it and build their own feature extractor. Rows equal a local
run's when the cell runs with the same torch threads and loader workers (``--threads``,
``--workers``; on Ray both default to what ``--cpus-per-cell`` allows).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import socket
from types import ModuleType
from typing import Any

import torch
from tqdm.auto import tqdm

from bench.errors import BenchError
from bench.registry import DATASETS, METHODS
from bench.runner.cell import Cell, Environment, describe_failure, resolve_device, run_cell
from bench.runner.config import RunConfig
from bench.runner.executors import OnFailure, OnResult
from bench.runner.heap import retain_freed_memory

INSTALL_HINT = 'pip install "flowad-bench[ray]"'

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def import_ray() -> ModuleType:
    try:
        import ray
    except ImportError as exc:
        raise BenchError(
            f"--executor ray needs Ray, which is not installed: {INSTALL_HINT}"
        ) from exc
    return ray


def plugin_modules(cells: list[Cell]) -> tuple[str, ...]:
    """Modules outside ``bench`` that define the grid's methods and datasets.

    Workers import them before running a cell, so a plugin the driver registered by
    importing a module (rather than through an entry point) exists on the workers too.
    """
    found = {METHODS.get(c.method).__module__ for c in cells}
    found |= {DATASETS.get(c.dataset).__module__ for c in cells}
    return tuple(sorted(m for m in found if m.split(".")[0] != "bench" and m != "__main__"))


def run_on_worker(
    cell: Cell, env: Environment, threads: int, modules: tuple[str, ...], debug: bool
) -> tuple[str, Any]:
    """The body of one Ray task: ("done", rows) or ("failed", reason), like a local cell."""
    try:
        for module in modules:
            importlib.import_module(module)
        torch.set_num_threads(threads)
        retain_freed_memory()
        env = dataclasses.replace(env, device=resolve_device(env.device))
        return "done", run_cell(cell, env)
    except Exception as exc:  # one broken cell must not stop the grid
        return "failed", describe_failure(exc, debug)


class RayExecutor:
    """Sends cells to a Ray cluster (or a local Ray instance it starts and shuts down)."""

    def __init__(
        self,
        address: str | None = None,
        cpus_per_cell: float = 1.0,
        gpus_per_cell: float | None = None,
        retries: int = 1,
        threads: int | None = None,
        workers: int | None = None,
        debug: bool = False,
    ) -> None:
        self.address = address
        self.cpus_per_cell = cpus_per_cell
        self.gpus_per_cell = gpus_per_cell
        self.retries = retries
        self.threads = threads or max(1, int(cpus_per_cell))
        self.workers = min(4, int(cpus_per_cell) // 2) if workers is None else workers
        self.debug = debug

    @classmethod
    def from_config(cls, config: RunConfig, debug: bool = False) -> RayExecutor:
        import_ray()  # fail before the run folder is touched
        return cls(
            address=config.ray_address,
            cpus_per_cell=config.cpus_per_cell,
            gpus_per_cell=config.gpus_per_cell,
            retries=config.retries,
            threads=config.threads,
            workers=config.workers,
            debug=debug,
        )

    def execute(
        self, cells: list[Cell], env: Environment, on_result: OnResult, on_failure: OnFailure
    ) -> None:
        """Run every cell; a Ray already initialised in this process is used as it is."""
        if not cells:
            return
        ray = import_ray()
        started = not ray.is_initialized()
        if started:
            self._connect(ray)
        try:
            self._run(ray, cells, env, on_result, on_failure)
        finally:
            if started:
                ray.shutdown()

    def _connect(self, ray: ModuleType) -> None:
        # "local": without an address Ray would join the last cluster `ray start` left here.
        address = self.address or os.environ.get("RAY_ADDRESS") or "local"
        check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, TimeoutError, RuntimeError) as exc:
            where = "a local Ray instance" if address == "local" else f"--ray-address {address}"
            raise BenchError(
                f"{where}: cannot start or join Ray ({exc}); on a cluster, run `ray start --head` "
                "on the head node first and pass its HOST:PORT"
            ) from exc

    def gpus(self, ray: ModuleType, device: str) -> float:
        """GPUs per task: as asked, else one wherever the cluster has GPUs and the device allows."""
        if self.gpus_per_cell is not None:
            return self.gpus_per_cell
        if device == "cpu":
            return 0.0
        has_gpus = ray.cluster_resources().get("GPU", 0) > 0
        if device == "cuda" and not has_gpus:
            raise BenchError("--device cuda: the Ray cluster has no GPUs")
        return 1.0 if has_gpus else 0.0

    def check_feasible(self, ray: ModuleType, gpus: float) -> None:
        """Ray would wait forever for a task no node can hold; say so at once instead."""
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        if any(r.get("CPU", 0) >= self.cpus_per_cell and r.get("GPU", 0) >= gpus for r in nodes):
            return
        have = "; ".join(f"{r.get('CPU', 0):g} CPUs, {r.get('GPU', 0):g} GPUs" for r in nodes)
        raise BenchError(
            f"--cpus-per-cell {self.cpus_per_cell:g} --gpus-per-cell {gpus:g}: no Ray node "
            f"has that much (nodes: {have or 'none'}); ask for less per cell"
        )

    def _run(
        self,
        ray: ModuleType,
        cells: list[Cell],
        env: Environment,
        on_result: OnResult,
        on_failure: OnFailure,
    ) -> None:
        gpus = self.gpus(ray, env.device)
        self.check_feasible(ray, gpus)
        task = ray.remote(run_on_worker).options(
            num_cpus=self.cpus_per_cell,
            num_gpus=gpus,
            max_retries=self.retries,
            retry_exceptions=False,
        )
        worker_env = dataclasses.replace(
            env,
            data_root=_absolute(env.data_root),
            device=env.device if gpus > 0 else "cpu",  # a task without GPUs must not use one
            workers=self.workers,
            progress=False,
            spill_dir=None,  # the run folder lives on the driver; workers spill to their temp
        )
        modules = plugin_modules(cells)
        pending = {
            task.remote(cell, worker_env, self.threads, modules, self.debug): cell for cell in cells
        }
        bar = tqdm(total=len(cells), desc="cells", unit="cell", disable=not env.progress)
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    self._collect(ray, ref, pending.pop(ref), on_result, on_failure)
                    bar.update()
        except KeyboardInterrupt:
            self._stop(ray, pending, on_result, on_failure)
            raise
        finally:
            bar.close()

    def _collect(
        self, ray: ModuleType, ref: Any, cell: Cell, on_result: OnResult, on_failure: OnFailure
    ) -> None:
        try:
            status, payload = ray.get(ref)
        except ray.exceptions.RayError as exc:
            on_failure(cell, describe_ray_failure(exc, ray.exceptions.RayTaskError, self.retries))
            return
        if status == "done":
            on_result(cell, payload)
        else:
            on_failure(cell, payload)

    def _stop(
        self, ray: ModuleType, pending: dict[Any, Cell], on_result: OnResult, on_failure: OnFailure
    ) -> None:
        """Ctrl-C: store what already finished, cancel the rest."""
        if not pending:
            return
        finished, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
        for ref in finished:
            self._collect(ray, ref, pending.pop(ref), on_result, on_failure)
        for ref in pending:
            ray.cancel(ref, force=True)  # a worker interrupted mid-import is not reusable


def describe_ray_failure(exc: Exception, task_error: type, retries: int) -> str:
    """One line for a cell Ray could not finish, without Ray's terminal colours."""
    lines = _ANSI.sub("", str(exc)).strip().splitlines() or [""]
    if isinstance(exc, task_error):  # Ray could not even start run_on_worker there
        hint = " (is the same flowad-bench installed on every Ray node?)"
        return f"on the Ray worker: {lines[-1]}" + (hint if "No module named" in lines[-1] else "")
    return f"{type(exc).__name__} after {retries} Ray retries: {lines[0]}"


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """ray.init keeps retrying an address where nothing listens for minutes; fail in seconds."""
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        return  # "auto", "local" or a ray:// client address: Ray resolves those itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise BenchError(
            f"--ray-address {address}: nothing answers there ({exc}); start the cluster with "
            f"`ray start --head --port {port}` on {host} first"
        ) from exc


def _absolute(root: str | None) -> str | None:
    """Workers do not share the driver's working directory; shared file systems share paths."""
    return os.path.abspath(os.path.expanduser(root)) if root else None
