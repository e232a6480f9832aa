"""Priorities: on a queue declared with a priority range (``App(max_priority=...)``), higher
priorities run first; a queue that exists with another range is a clear declaration conflict
(real broker and workers, both brokers)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

import taskq
from taskq import App
from taskq.broker.sqlite.store import SCHEMA_VERSION

from .apps import basic
from .apps.priorities import MAX_PRIORITY
from .support import Broker, SqliteBroker, WorkerProcess, lines, run_taskq


def test_higher_priorities_run_first(
        make_app: Callable[..., App], broker: Broker, queue: str, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given 20 tasks queued at priorities 0-9 (and one above the range of 10, which counts
    as 10) before any worker runs, when one slot runs them, then they run highest first
    and, within a priority, in the order sent; each once."""
    tasks = basic.build(make_app(max_priority=MAX_PRIORITY))
    path = tmp_path / "ran"
    sent = [(i % 10, f"p{i % 10}-{i}") for i in range(20)] + [(200, "p10-top")]
    results = [tasks.record.apply_async((str(path), token), priority=priority)
               for priority, token in sent]
    results.append(tasks.record.delay(str(path), "p0-none"))  # no priority: the lowest
    start_worker("-P", "threads", app="tests.apps.priorities:app", concurrency=1)
    for result in results:
        result.get(timeout=30)
    ran = lines(path)
    assert sorted(ran) == sorted([t for _, t in sent] + ["p0-none"])
    priorities = [int(token.split("-")[0][1:]) for token in ran]
    assert priorities == sorted(priorities, reverse=True), ran
    assert ran[:3] == ["p10-top", "p9-9", "p9-19"]  # FIFO within one priority
    assert ran[-1] == "p0-none"
    assert broker.counts(queue) == (0, 1) and broker.dead_letter_count(queue) == 0


def test_a_tasks_own_priority_puts_it_first(
        make_app: Callable[..., App], tmp_path: Path, queue: str,
        start_worker: Callable[..., WorkerProcess]) -> None:
    app = make_app(max_priority=MAX_PRIORITY)
    tasks = basic.build(app)
    urgent = app.task(name="tests.apps.basic.stamp", priority=5)(basic.stamp)
    path = tmp_path / "ran"
    low = [tasks.stamp.delay(str(path), f"low{i}") for i in range(5)]
    high = urgent.delay(str(path), "high")
    start_worker(app="tests.apps.priorities:app", concurrency=1)
    assert high.get(timeout=30) < min(r.get(timeout=30) for r in low)


def test_a_queue_that_exists_without_priorities_is_a_declaration_conflict(
        make_app: Callable[..., App], broker: Broker, queue: str) -> None:
    basic.build(make_app()).add.delay(1, 1)  # declares the queue with no priority range
    tasks = basic.build(make_app(max_priority=MAX_PRIORITY))
    with pytest.raises(taskq.DeclarationConflict, match=f"queue '{queue}' already exists"):
        tasks.add.delay(1, 1)
    worker = run_taskq("worker", "-A", "tests.apps.priorities:app", "-Q", queue,
                       env={"TASKQ_BROKER_URL": broker.url}, timeout=60)
    assert worker.returncode == 1
    last = worker.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: queue '{queue}' already exists with different settings")


@pytest.mark.parametrize("value", [0, 256, 2.5, True, "10", {"q": 0}])
def test_a_priority_range_outside_1_to_255_is_a_clear_error(value: object) -> None:
    with pytest.raises(taskq.ConfigurationError, match="max_priority must be a whole number"):
        App("sqlite:///unused.db", max_priority=value)


@pytest.mark.parametrize("value", [-1, 256, 1.5, "high"])
def test_a_message_priority_outside_0_to_255_is_a_clear_error(value: object) -> None:
    tasks = basic.build(App("sqlite:///unused.db", max_priority=10))
    with pytest.raises(taskq.ConfigurationError, match="priority must be a whole number"):
        tasks.add.apply_async((1, 1), priority=value)  # type: ignore[arg-type]
    with pytest.raises(taskq.ConfigurationError, match="priority must be a whole number"):
        App("sqlite:///unused.db").task(priority=value)(basic.add)  # type: ignore[arg-type]


@pytest.mark.embedded
def test_a_file_of_the_previous_schema_is_brought_up_to_date_with_its_messages(
        tmp_path: Path, queue: str, broker_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Given a file made by taskq with schema 1 (no priorities) holding a queued task, when
    this taskq opens it, then the file is migrated in place (1 → 2 → 3) and the task runs."""
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_1)
    db.execute("INSERT INTO meta VALUES ('format', 'taskq'), ('schema', '1')")
    db.commit()
    db.close()
    old = SqliteBroker(path)
    monkeypatch.setenv("TASKQ_BROKER_URL", old.url)
    app = App(old.url, default_queue=queue)
    result = basic.build(app).add.delay(2, 3)  # written as schema 3 now, read by the worker
    with sqlite3.connect(path) as check:
        assert check.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == (
            str(SCHEMA_VERSION),)
        tables = {row[0] for row in check.execute("SELECT name FROM sqlite_master")}
        assert {"chord_parts", "sent", "beat", "members"} <= tables
    worker = WorkerProcess(old, "tests.apps.basic:app", [queue], tmp_path / "worker.log")
    try:
        assert result.get(timeout=30) == 5
    finally:
        worker.stop()
        app.close()


#: The embedded broker's schema 1 (taskq before priorities), as such files have it.
SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE queues (name TEXT PRIMARY KEY, created REAL NOT NULL);
CREATE TABLE messages (id INTEGER PRIMARY KEY, queue TEXT NOT NULL, due REAL NOT NULL,
    body BLOB NOT NULL, props TEXT NOT NULL, holder INTEGER,
    deliveries INTEGER NOT NULL DEFAULT 0, lost INTEGER NOT NULL DEFAULT 0);
CREATE INDEX messages_ready ON messages (queue, due, id) WHERE holder IS NULL;
CREATE INDEX messages_held ON messages (holder) WHERE holder IS NOT NULL;
CREATE TABLE replies (id INTEGER PRIMARY KEY, queue TEXT NOT NULL, body BLOB NOT NULL,
                      props TEXT NOT NULL);
CREATE INDEX replies_queue ON replies (queue);
CREATE TABLE reply_queues (name TEXT PRIMARY KEY, holder INTEGER NOT NULL);
CREATE TABLE dead (id INTEGER PRIMARY KEY, queue TEXT NOT NULL, body BLOB NOT NULL,
    props TEXT NOT NULL, exception TEXT NOT NULL, reason TEXT NOT NULL, dead_at TEXT NOT NULL,
    worker TEXT NOT NULL);
CREATE INDEX dead_queue ON dead (queue, id);
CREATE TABLE holders (id INTEGER PRIMARY KEY, pid INTEGER NOT NULL, host TEXT NOT NULL,
                      started REAL NOT NULL);
"""
