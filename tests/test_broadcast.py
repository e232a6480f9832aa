"""Broadcast: every worker of a queue that is up when a task is broadcast runs it once; the
caller collects one result per worker, by worker name (real broker and workers, both
brokers)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest

import taskq
from taskq import App, BroadcastResult

from .apps import basic
from .support import Broker, WorkerProcess, lines, wait_for


def _name(worker: WorkerProcess) -> str:
    return f"{worker.pid}@{socket.gethostname()}"


def _member(worker: WorkerProcess) -> str:
    return f"taskq.worker.{_name(worker)}.broadcasts"


def _listening(*workers: WorkerProcess) -> list[WorkerProcess]:
    """Wait until each worker's slots consume its broadcast queue (a worker counts as ready
    once the work queue has enough consumers: with two workers, the first one's do)."""
    def ready() -> bool:
        return all(w.broker.exists(_member(w)) and w.broker.counts(_member(w))[1] >= w.concurrency
                   for w in workers)
    wait_for(ready, 30, "the workers' broadcast queues to be consumed")
    return list(workers)


def test_every_worker_up_runs_a_broadcast_once_and_answers(
        make_app: Callable[..., App], broker: Broker, queue: str, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given two workers of <queue> with two slots each, when a task is broadcast, then each
    worker runs it once (one of its slots), the caller gets both results keyed by worker,
    and no message is left in any queue."""
    workers = _listening(start_worker(), start_worker())
    tasks = basic.build(make_app())
    path = tmp_path / "ran"
    result = tasks.record.apply_async((str(path), "hello"), broadcast=True)
    assert isinstance(result, BroadcastResult)
    assert result.get(timeout=15, workers=2) == {_name(w): "hello" for w in workers}
    assert lines(path) == ["hello", "hello"]
    pids = tasks.whoami.apply_async(broadcast=True).get(timeout=15, workers=2)
    assert sorted(pids) == sorted(_name(w) for w in workers)
    assert len(set(pids.values())) == 2  # run by a slot of each worker
    assert broker.counts(queue) == (0, 4) and broker.dead_letter_count(queue) == 0
    for worker in workers:
        assert broker.counts(_member(worker))[0] == 0


def test_get_collects_for_its_timeout_and_a_late_worker_never_runs_it(
        make_app: Callable[..., App], queue: str, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    (first,) = _listening(start_worker())
    tasks = basic.build(make_app())
    path = tmp_path / "ran"
    result = tasks.record.apply_async((str(path), "once"), broadcast=True)
    (late,) = _listening(start_worker())
    assert result.get(timeout=2) == {_name(first): "once"}  # collected for the 2 s
    assert tasks.add.apply_async((1, 1), broadcast=True).get(timeout=15, workers=2) == {
        _name(first): 2, _name(late): 2}
    assert lines(path) == ["once"]


def test_a_task_can_be_a_broadcast_and_failures_come_back_per_worker(
        make_app: Callable[..., App], start_worker: Callable[..., WorkerProcess]) -> None:
    workers = _listening(start_worker(), start_worker())
    app = make_app()
    failing = app.task(name="tests.apps.basic.fail", broadcast=True)(basic.fail)
    result = failing.delay("ValueError", "everywhere")
    with pytest.raises(ValueError, match="everywhere"):
        result.get(timeout=15, workers=2)
    errors = result.get(timeout=0, propagate=False)
    assert sorted(errors) == sorted(_name(w) for w in workers)
    assert all(isinstance(e, ValueError) for e in errors.values())


def test_a_broadcast_with_no_worker_up_is_unroutable(
        make_app: Callable[..., App], queue: str) -> None:
    tasks = basic.build(make_app())
    with pytest.raises(taskq.Unroutable, match=f"no worker of queue '{queue}' is up"):
        tasks.add.apply_async((1, 1), broadcast=True)


def test_a_worker_that_stopped_no_longer_receives_broadcasts(
        make_app: Callable[..., App], broker: Broker, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    stays, leaves = _listening(start_worker(), start_worker())
    leaves.stop()
    assert not broker.exists(_member(leaves))
    tasks = basic.build(make_app())
    path = tmp_path / "ran"
    assert tasks.record.apply_async((str(path), "x"), broadcast=True).get(timeout=2) == {
        _name(stays): "x"}


def test_ignore_result_and_delays_with_a_broadcast(
        make_app: Callable[..., App], tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    _listening(start_worker())
    tasks = basic.build(make_app())
    path = tmp_path / "ran"
    quiet = tasks.record.apply_async((str(path), "quiet"), broadcast=True, ignore_result=True)
    with pytest.raises(taskq.ResultUnavailable):
        quiet.get()
    wait_for(lambda: lines(path) == ["quiet"], 15, "the broadcast to run")
    with pytest.raises(taskq.ConfigurationError, match="as a broadcast can't be delayed"):
        tasks.add.apply_async((1, 1), broadcast=True, countdown=1)


def test_eager_mode_runs_a_broadcast_here_once(tmp_path: Path) -> None:
    tasks = basic.build(App(f"sqlite:///{tmp_path}/unused.db", eager=True))
    assert tasks.add.apply_async((2, 2), broadcast=True).get() == {"eager": 4}
