"""Review of the embedded broker: each test here shows a defect (it fails while it exists)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from taskq import App

from .apps import basic
from .support import ROOT, SqliteBroker, WorkerProcess, lines, unique, wait_for

pytestmark = pytest.mark.embedded

QUICK_APP = """
from taskq import App
from tests.apps import basic
app = App(publish_timeout=1.0)
tasks = basic.build(app)
"""


def _quick_app(tmp_path: Path) -> dict[str, str]:
    """A worker app whose store gives up on a locked file after 1s (instead of 15s)."""
    (tmp_path / "review_app.py").write_text(QUICK_APP)
    return {"PYTHONPATH": f"{tmp_path}:{ROOT}"}


def _held(broker: SqliteBroker, queue: str) -> int:
    db = sqlite3.connect(str(broker.path), timeout=30)
    try:
        return int(db.execute("SELECT COUNT(*) FROM messages WHERE queue = ?",
                              (queue,)).fetchone()[0])
    finally:
        db.close()


def _within(predicate: Callable[[], object], timeout: float) -> bool:
    try:
        wait_for(predicate, timeout, "it")
    except AssertionError:
        return False
    return True


def test_a_settle_that_fails_leaves_the_message_held_by_a_live_slot_and_it_runs_again(
        broker: SqliteBroker, queue: str, tmp_path: Path, make_app: Callable[..., App],
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given a slot whose settle fails (the file stayed locked longer than publish_timeout),
    the slot drops its link and opens a new one; the message it held must come back (as on
    RabbitMQ) or be settled. It is neither: it stays held by the live process, so it is never
    acked, and when the worker is later stopped cleanly and another starts, the task that
    already finished (and whose result the caller got) runs a second time."""
    worker = start_worker(app="review_app:app", concurrency=1, env=_quick_app(tmp_path))
    tasks = basic.build(make_app())
    log, release = tmp_path / "runs", tmp_path / "release"
    result = tasks.note_then_block.delay(str(log), "t", str(release))
    wait_for(lambda: lines(log), 20, "the task to start")

    lock = sqlite3.connect(str(broker.path), isolation_level=None, timeout=30)
    lock.execute("BEGIN IMMEDIATE")  # another process's long write transaction
    try:
        release.touch()
        wait_for(lambda: "BrokerUnavailable" in worker.log(), 20, "the settle to fail")
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert result.get(timeout=20) == "t"  # the stashed result is sent on the new link
    settled = _within(lambda: _held(broker, queue) == 0, 8)

    worker.stop()  # warm: exit 0, no process died mid-task
    start_worker(concurrency=1)
    wait_for(lambda: _held(broker, queue) == 0, 20, "the queue to be empty")
    runs = len(lines(log)) // 3
    assert settled and runs == 1, (
        f"message settled while its worker lived: {settled}; runs of the task: {runs}")


def test_busy_slots_make_a_publisher_unable_to_wake_an_idle_worker(
        broker: SqliteBroker, queue: str, tmp_path: Path, make_app: Callable[..., App],
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given 30 slots busy with long tasks on one queue (they don't read their wake socket),
    when a client keeps sending to that queue, each datagram it sends to a busy slot stays
    charged to the client's one wake socket; past ~26 busy listeners its send buffer is full,
    every later wake-up from that client fails with EAGAIN (taken for "awake already"), and a
    task it sends to an idle worker on another queue waits for the 2 s fallback poll."""
    busy = unique("busy")
    start_worker("--pool", "threads", queues=[busy], concurrency=30)
    start_worker(concurrency=1)
    tasks = basic.build(make_app())
    release = tmp_path / "release"
    try:
        def round_trip() -> float:
            started = time.monotonic()
            assert tasks.add.delay(1, 1).get(timeout=10) == 2
            return time.monotonic() - started

        baseline = [round_trip() for _ in range(3)]
        assert max(baseline) < 0.3, baseline
        for _ in range(30):
            tasks.wait_for_file.apply_async((str(release),), queue=busy)
        wait_for(lambda: broker.queue_info(busy)["messages_unacknowledged"] == "30", 30,
                 "30 busy slots")
        for _ in range(12):  # more work for the busy queue: wake-ups to the 30 busy slots
            tasks.wait_for_file.apply_async((str(release),), queue=busy)
        after = [round_trip() for _ in range(4)]
        assert max(after) < 0.3, f"round trips before: {baseline}, after: {after}"
    finally:
        release.touch()
