"""Worker modes for scripts and long runs: ``--burst``, ``--max-tasks-per-child``,
``--max-memory-per-child`` (real workers, both brokers)."""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

from .support import Broker, WorkerProcess, lines, run_taskq, wait_for


def test_a_burst_worker_runs_what_is_queued_then_exits_0(
        tasks: SimpleNamespace, broker: Broker, queue: str, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given 30 tasks queued and one delayed by a minute, when a --burst worker starts, then
    it runs each of the 30 once and exits 0, leaving only the delayed one queued."""
    path = tmp_path / "ran"
    results = tasks.record.delay_many([(str(path), f"t{i}") for i in range(30)])
    later = tasks.record.apply_async((str(path), "later"), countdown=60)
    worker = start_worker("--burst", ready=False)
    assert worker.wait(60) == 0, worker.log()
    assert sorted(lines(path)) == sorted(f"t{i}" for i in range(30))
    assert [r.get(timeout=5) for r in results] == [f"t{i}" for i in range(30)]
    assert broker.counts(queue) == (0, 0)
    assert broker.dead_letter_count(queue) == 0
    assert not later.ready()
    assert "no message ready" in worker.log() and "ERROR" not in worker.log()


def test_a_burst_worker_on_empty_queues_exits_at_once(
        broker: Broker, queue: str, start_worker: Callable[..., WorkerProcess]) -> None:
    worker = start_worker("--burst", ready=False, concurrency=1)
    assert worker.wait(30) == 0, worker.log()
    assert "worker stopped: no message ready" in worker.log()


def test_a_burst_worker_of_threads_exits_0_too(
        tasks: SimpleNamespace, broker: Broker, queue: str, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    path = tmp_path / "ran"
    tasks.record.delay_many([(str(path), f"t{i}") for i in range(5)])
    worker = start_worker("--burst", "-P", "threads", ready=False)
    assert worker.wait(60) == 0, worker.log()
    assert sorted(lines(path)) == [f"t{i}" for i in range(5)]
    assert broker.counts(queue) == (0, 0)


def _pids_per_run(tasks: SimpleNamespace, count: int) -> list[int]:
    return [tasks.whoami.delay().get(timeout=30) for _ in range(count)]


def test_max_tasks_per_child_replaces_the_slot_process_between_tasks(
        tasks: SimpleNamespace, broker: Broker, queue: str,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given -c 1 --max-tasks-per-child 3, when 10 tasks run one after another, then each
    ran exactly once, and a new slot process took over after every third."""
    worker = start_worker("--max-tasks-per-child", "3", concurrency=1)
    pids = _pids_per_run(tasks, 10)
    per_pid = collections.Counter(pids)
    assert list(per_pid.values()) == [3, 3, 3, 1], pids
    assert worker.pid not in per_pid
    wait_for(lambda: worker.log().count("replacing the slot process: it ran 3 tasks") == 3,
             10, "the third replacement's log line")  # logged after the result went out
    assert "ERROR" not in worker.log()
    assert broker.counts(queue) == (0, 1)
    assert broker.dead_letter_count(queue) == 0


def test_max_memory_per_child_replaces_a_slot_process_over_the_bound(
        tasks: SimpleNamespace, start_worker: Callable[..., WorkerProcess]) -> None:
    """A bound of 1 MiB, which any Python process is over: a new process for every task."""
    worker = start_worker("--max-memory-per-child", "1", concurrency=1)
    pids = _pids_per_run(tasks, 3)
    assert len(set(pids)) == 3
    wait_for(lambda: worker.log().count("over --max-memory-per-child 1") == 3, 10,
             "the third replacement's log line")
    assert "ERROR" not in worker.log()


def test_recycling_needs_the_process_pool(broker: Broker, queue: str) -> None:
    result = run_taskq("worker", "-A", "tests.apps.basic:app", "-Q", queue, "-P", "threads",
                       "--max-tasks-per-child", "5", env={"TASKQ_BROKER_URL": broker.url})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: --max-tasks-per-child and --max-memory-per-child replace slot processes: use "
        "them with --pool process")
