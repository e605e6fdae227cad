"""Training batches split over CPU worker threads (bench.kernels): the choice, the thread
shares, and that a split step is the whole batch's step up to rounding."""

from __future__ import annotations

import multiprocessing
import threading

import pytest
import torch

from bench.errors import BenchError
from bench.kernels import (
    WORKERS_ENV,
    backward_in_parts,
    choose_workers,
    cpu_workers,
    map_parts,
)
from bench.methods.csflow import csflow_loss
from bench.methods.fastflow import FastFlowModel, fastflow_loss


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("choice", "threads", "expected"),
    [("auto", 1, 1), ("auto", 2, 2), ("auto", 16, 2), ("1", 8, 1), ("4", 2, 2), (" 3 ", 8, 3)],
)
def test_choose_workers(choice: str, threads: int, expected: int) -> None:
    assert choose_workers(choice, threads) == expected


@pytest.mark.parametrize("choice", ["0", "two", "-1", ""])
def test_a_bad_worker_count_names_the_variable(choice: str) -> None:
    with pytest.raises(BenchError, match=f"{WORKERS_ENV}={choice.strip()}: expected auto"):
        choose_workers(choice, 2)


def test_environment_overrides_the_choice(monkeypatch, two_threads) -> None:
    monkeypatch.setenv(WORKERS_ENV, "1")
    assert cpu_workers() == 1
    monkeypatch.setenv(WORKERS_ENV, "auto")
    assert cpu_workers() == 2


def test_parts_run_on_workers_with_a_share_of_the_threads(monkeypatch, two_threads) -> None:
    monkeypatch.setenv(WORKERS_ENV, "2")
    barrier = threading.Barrier(2, timeout=30)

    def where(part: int) -> tuple[int, str, int, bool]:
        barrier.wait()  # both parts are in flight at once, on two threads
        name = threading.current_thread().name
        return part, name, torch.get_num_threads(), torch.is_grad_enabled()

    results = map_parts(where, [0, 1])
    assert [r[0] for r in results] == [0, 1]
    assert len({r[1] for r in results}) == 2
    assert all(r[1].startswith("flowad-cpu") for r in results)
    assert [r[2] for r in results] == [1, 1]
    assert all(r[3] for r in results)
    with torch.no_grad():  # grad mode is per thread: the caller's carries over
        assert not any(r[3] for r in map_parts(where, [0, 1]))
    assert torch.get_num_threads() == 2
    assert map_parts(lambda x: x * 10, [1, 2, 3, 4, 5]) == [10, 20, 30, 40, 50]


def test_one_worker_runs_in_the_calling_thread(monkeypatch, two_threads) -> None:
    monkeypatch.setenv(WORKERS_ENV, "1")
    assert (
        map_parts(lambda _: threading.current_thread(), [0, 1]) == [threading.current_thread()] * 2
    )


def _model_and_batch() -> tuple[FastFlowModel, list[torch.Tensor]]:
    torch.manual_seed(0)
    shapes = [(8, 16, 16), (16, 8, 8)]
    model = FastFlowModel(shapes, 4, 1.0, False, True)
    generator = torch.Generator().manual_seed(1)
    return model, [torch.randn(6, *s, generator=generator) for s in shapes]


def test_split_training_step_equals_the_whole_batch(monkeypatch, two_threads) -> None:
    steps = {}
    for workers in ("1", "2", "2"):
        monkeypatch.setenv(WORKERS_ENV, workers)
        model, features = _model_and_batch()
        params = [p for p in model.parameters() if p.requires_grad]
        loss = backward_in_parts(
            lambda part, size, m=model: fastflow_loss(*m(part), batch_size=size), params, features
        )
        steps.setdefault(workers, []).append((loss, [p.grad.clone() for p in params]))
    (whole_loss, whole), (split_loss, split), (again_loss, again) = steps["1"][0], *steps["2"]
    model, features = _model_and_batch()
    expected = fastflow_loss(*model(features))
    assert torch.equal(whole_loss, expected.detach())
    torch.testing.assert_close(split_loss, whole_loss, rtol=1e-6, atol=0)
    for a, b in zip(split, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # Reproducible for a given split: the parts' gradients are summed in a fixed order.
    assert torch.equal(split_loss, again_loss)
    assert all(torch.equal(a, b) for a, b in zip(split, again, strict=True))


@pytest.mark.parametrize("how", ["per-image", "batch-sum"])
def test_parts_shares_add_up_to_each_methods_batch_loss(how: str) -> None:
    generator = torch.Generator().manual_seed(5)
    latents = [
        torch.randn(7, 4, 6, 6, generator=generator),
        torch.randn(7, 8, 3, 3, generator=generator),
    ]
    log_det = torch.randn(7, generator=generator, dtype=torch.float64).float()
    parts = [slice(0, 3), slice(3, 7)]

    def shares(loss, *args, **kwargs) -> torch.Tensor:
        return sum(
            loss([z[p] for z in latents], *(a[p] for a in args), **kwargs, batch_size=7)
            for p in parts
        )

    torch.testing.assert_close(
        shares(csflow_loss, log_det, how=how), csflow_loss(latents, log_det, how)
    )
    log_dets = [log_det, 2 * log_det]
    whole = fastflow_loss(latents, log_dets)
    split = sum(
        fastflow_loss([z[p] for z in latents], [j[p] for j in log_dets], batch_size=7)
        for p in parts
    )
    torch.testing.assert_close(split, whole)


def test_split_gradients_add_to_existing_ones_and_skip_unused_parameters(
    monkeypatch, two_threads
) -> None:
    monkeypatch.setenv(WORKERS_ENV, "2")
    used, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    used.grad = torch.full((3,), 10.0)
    x = torch.arange(12.0).reshape(4, 3)
    loss = backward_in_parts(
        lambda part, size: (part[0] * used).sum() / (size or 4), [used, unused], [x]
    )
    assert torch.equal(loss, (x * used).sum().detach() / 4)
    assert torch.equal(used.grad, 10.0 + x.sum(0) / 4)
    assert unused.grad is None


def _split_in_child(queue) -> None:  # noqa: ANN001
    torch.set_num_threads(2)
    queue.put(map_parts(lambda x: x + 1, [1, 2, 3]))


def test_a_forked_child_starts_its_own_workers(monkeypatch, two_threads) -> None:
    """The parent's pool threads do not exist in a forked child (a loader worker, a
    forked executor); the child must not wait on them."""
    monkeypatch.setenv(WORKERS_ENV, "2")
    barrier = threading.Barrier(2, timeout=30)

    def together(x: int) -> int:
        barrier.wait()  # both pool threads exist, and are idle afterwards
        return x

    assert map_parts(together, [0, 1]) == [0, 1]
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_split_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():  # waiting on threads it does not have
        child.kill()
    assert child.exitcode == 0
    assert queue.get(timeout=5) == [2, 3, 4]
