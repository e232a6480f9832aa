"""``taskq dlq``: list, show, replay and purge dead letters."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from .support import ROOT, Broker, WorkerProcess, lines, wait_for


@pytest.fixture
def dead_records(tasks: SimpleNamespace, broker: Broker, queue: str, tmp_path: Path,
                 start_worker: Callable[..., WorkerProcess]) -> list[str]:
    """Three ``record`` tasks dead-lettered by a worker that doesn't know that task."""
    worker = start_worker(app="tests.apps.partial:app", concurrency=1)
    ids = [tasks.record.delay(str(tmp_path / "effects"), f"r{i}").id for i in range(3)]
    wait_for(lambda: broker.exists(f"{queue}.dlq") and broker.counts(f"{queue}.dlq")[0] == 3,
             15, "three dead letters")
    worker.stop()
    return ids


def dlq(broker: Broker, *args: str, stdin: str | None = None) -> tuple[int, str]:
    """Run ``taskq dlq ...`` against the test vhost; (exit code, everything it printed)."""
    proc = subprocess.run([sys.executable, "-m", "taskq", "dlq", *args], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=60,
                          env={"TASKQ_BROKER_URL": broker.url, "PATH": "/usr/bin"})
    return proc.returncode, proc.stdout + proc.stderr


def test_list_shows_a_readable_table(broker: Broker, queue: str,
                                     dead_records: list[str]) -> None:
    code, out = dlq(broker, "list", queue)
    assert code == 0, out
    header, columns, *rows = out.splitlines()
    assert header == f"{queue}.dlq: 3 dead letters"
    assert columns.split() == ["ID", "TASK", "EXCEPTION", "DEAD", "AT", "REASON"]
    assert [row.split()[0] for row in rows] == dead_records
    assert all("tests.apps.basic.record" in row and "NotRegistered" in row for row in rows)
    code, out = dlq(broker, "list", f"{queue}.dlq", "--limit", "1")  # either name works
    assert code == 0 and "(showing 1)" in out
    assert broker.counts(f"{queue}.dlq")[0] == 3  # listing removes nothing


def test_show_prints_one_dead_letter_in_full(broker: Broker, queue: str,
                                            dead_records: list[str]) -> None:
    code, out = dlq(broker, "show", dead_records[1], "-Q", queue)
    assert code == 0, out
    fields = dict(line.split(":", 1) for line in out.splitlines())
    assert fields["id"].strip() == dead_records[1]
    assert fields["task"].strip() == "tests.apps.basic.record"
    assert fields["queue"].strip() == queue
    assert fields["exception"].strip() == "NotRegistered"
    assert "no task named 'tests.apps.basic.record'" in fields["reason"]
    assert "'r1'" in fields["args"]
    code, out = dlq(broker, "show", "no-such-id", "-Q", queue)
    assert code == 1 and "no dead letter with id no-such-id" in out


def test_replay_sends_dead_letters_back_to_run_again(
        broker: Broker, queue: str, tmp_path: Path, dead_records: list[str],
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given dead letters for a task that a newly started worker knows, replaying one by id
    and then the rest runs each exactly once, and empties the dead-letter queue."""
    start_worker(concurrency=1)
    effects = tmp_path / "effects"
    code, out = dlq(broker, "replay", queue, "--id", dead_records[0])
    assert code == 0 and "1 replayed" in out, out
    wait_for(lambda: lines(effects) == ["r0"], 15, "the replayed task to run")
    assert broker.counts(f"{queue}.dlq")[0] == 2
    code, out = dlq(broker, "replay", queue, "--all")
    assert code == 0 and "2 replayed" in out, out
    wait_for(lambda: sorted(lines(effects)) == ["r0", "r1", "r2"], 15, "the others to run")
    assert broker.counts(f"{queue}.dlq")[0] == 0


def test_replay_needs_to_be_told_what(broker: Broker, queue: str,
                                      dead_records: list[str]) -> None:
    code, out = dlq(broker, "replay", queue)
    assert code == 2 and "--id ID" in out and "--all" in out
    code, out = dlq(broker, "replay", queue, "--id", "nope")
    assert code == 1 and "not found" in out
    assert broker.counts(f"{queue}.dlq")[0] == 3


def test_purge_asks_first_unless_told_yes(broker: Broker, queue: str,
                                          dead_records: list[str]) -> None:
    code, out = dlq(broker, "purge", queue, stdin="n\n")
    assert code == 1 and "Delete 3 dead letter(s)" in out and "Aborted" in out
    assert broker.counts(f"{queue}.dlq")[0] == 3
    code, out = dlq(broker, "purge", queue, "--yes")
    assert code == 0 and "purged 3" in out
    assert broker.counts(f"{queue}.dlq")[0] == 0
    code, out = dlq(broker, "list", queue)
    assert code == 0 and out.strip() == f"{queue}.dlq: empty"


def test_a_queue_that_does_not_exist_is_a_clear_error(broker: Broker) -> None:
    code, out = dlq(broker, "list", "never-declared")
    assert code == 1 and "queue 'never-declared.dlq' does not exist" in out
    assert "Traceback" not in out


def test_replaying_an_expired_letter_runs_it_and_says_its_expiry_was_cleared(
        tasks: SimpleNamespace, broker: Broker, queue: str, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given a task that expired before its countdown let it run (dead-lettered as
    TaskExpired), replaying it clears the expiry, says so, and the task runs once."""
    start_worker(concurrency=1)
    effects = tmp_path / "effects"
    expired = tasks.record.apply_async((str(effects), "late"), countdown=1.5, expires=0.5)
    wait_for(lambda: broker.exists(f"{queue}.dlq") and broker.counts(f"{queue}.dlq")[0] == 1,
             15, "the expired task's dead letter")
    assert not effects.exists()
    code, out = dlq(broker, "replay", queue, "--id", expired.id)
    assert code == 0 and "its expiry had passed and was cleared" in out, out
    wait_for(lambda: lines(effects) == ["late"], 15, "the replayed task to run")
    assert broker.counts(f"{queue}.dlq")[0] == 0
