"""Retries: a new delayed message carrying the retry count; the caller's one handle gets the end."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

import taskq
from taskq import App

from .support import Broker, WorkerProcess, lines, wait_for


@pytest.fixture
def worker(start_worker: Callable[..., WorkerProcess]) -> WorkerProcess:
    return start_worker()


def test_self_retry_runs_again_until_it_succeeds(
        tasks: SimpleNamespace, tmp_path: Path, worker: WorkerProcess) -> None:
    """Given a bound task failing twice with ``raise self.retry(...)``, the caller's single
    AsyncResult gets the third attempt's value; each attempt saw its retry count and id."""
    log = tmp_path / "attempts"
    result = tasks.flaky.delay(str(log), 2)
    assert result.get(timeout=20) == [2]
    attempts = [line.split() for line in log.read_text().splitlines()]
    assert [a[1] for a in attempts] == ["0", "1", "2"]
    assert {a[0] for a in attempts} == {result.id}
    assert {a[2] for a in attempts} == {"False"}  # delivery_info["redelivered"]


def test_after_max_retries_the_last_exception_is_the_result(
        make_app: Callable[..., App], tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given max_retries=2 and a task that always fails with self.retry(exc=...), it runs
    3 times and get() raises that last exception."""
    from .apps import retrying

    start_worker(app="tests.apps.retrying:app")
    tasks = retrying.build(make_app())
    log = tmp_path / "attempts"
    with pytest.raises(ValueError, match="attempt 2 failed"):
        tasks.always_fails.delay(str(log)).get(timeout=20)
    assert lines(log) == ["0", "1", "2"]


def test_retry_without_an_exception_past_the_limit_is_max_retries_exceeded(
        make_app: Callable[..., App], start_worker: Callable[..., WorkerProcess]) -> None:
    from .apps import retrying

    start_worker(app="tests.apps.retrying:app")
    tasks = retrying.build(make_app())
    with pytest.raises(taskq.MaxRetriesExceededError, match="max_retries=1"):
        tasks.retry_forever.delay().get(timeout=20)


def test_autoretry_for_backs_off_exponentially(
        tasks: SimpleNamespace, tmp_path: Path, worker: WorkerProcess) -> None:
    """Given autoretry_for=(ConnectionError,), retry_backoff=0.2, retry_backoff_max=0.5,
    no jitter and max_retries=3: 4 attempts, each at least its backoff after the last
    (0.2, 0.4, then capped at 0.5), and the final ConnectionError reaches the caller."""
    log = tmp_path / "attempts"
    with pytest.raises(ConnectionError, match="service unavailable"):
        tasks.unreliable.delay(str(log)).get(timeout=20)
    rows = [line.split() for line in log.read_text().splitlines()]
    assert [r[0] for r in rows] == ["0", "1", "2", "3"]
    times = [float(r[1]) for r in rows]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    for gap, backoff in zip(gaps, [0.2, 0.4, 0.5], strict=True):
        assert backoff <= gap <= backoff + 1.0, gaps


def test_a_retry_waits_in_the_broker_and_the_caller_sees_retry_state(
        make_app: Callable[..., App], broker: Broker, queue: str, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """While a retry waits its countdown, no worker holds it (nothing unacked), and the
    caller's handle reports RETRY until the final outcome arrives."""
    from .apps import retrying

    start_worker(app="tests.apps.retrying:app")
    tasks = retrying.build(make_app())
    marker = tmp_path / "marker"
    result = tasks.retry_once_slowly.delay(str(marker))
    wait_for(lambda: result.state == "RETRY", 10, "the caller to see RETRY")
    assert not result.ready()
    info = broker.queue_info(queue)
    assert (info["messages_ready"], info["messages_unacknowledged"]) == ("0", "0")
    assert result.get(timeout=20) == "second attempt"
    assert lines(marker) == ["attempt", "attempt"]
