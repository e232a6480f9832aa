"""Countdown, ETA and expiry, held by the broker: no worker holds a message before it is due."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest

import taskq

from .support import Broker, WorkerProcess, lines, rabbitmqctl, wait_for

#: "runs within about a second after it is due" (the broker's TTL hops add a few ms each).
SOON = 1.0


def delayed_counts(broker: Broker) -> tuple[int, int]:
    """(number of delay queues, messages waiting in them) in the test vhost."""
    out = rabbitmqctl("list_queues", "-q", "--no-table-headers", "-p", broker.vhost, "name",
                      "messages")
    rows = [line.split("\t") for line in out.splitlines() if line.startswith("taskq.delayed.")]
    return len(rows), sum(int(count) for _, count in rows)


def stamps(path: Path) -> dict[str, float]:
    words = lines(path)
    return {words[i]: float(words[i + 1]) for i in range(0, len(words), 2)}


@pytest.mark.rabbitmq
def test_a_countdown_task_waits_in_the_broker_not_in_a_worker(
        tasks: SimpleNamespace, broker: Broker, queue: str, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given a worker, a task sent with countdown=5 is not run before it is due, and while it
    waits the broker holds it in a delay queue: nothing ready or unacked in the work queue."""
    start_worker()
    path = tmp_path / "stamps"
    _, waiting_before = delayed_counts(broker)
    sent = time.time()
    result = tasks.stamp.apply_async((str(path), "t"), countdown=5)
    assert delayed_counts(broker)[1] == waiting_before + 1
    info = broker.queue_info(queue)
    assert (info["messages_ready"], info["messages_unacknowledged"]) == ("0", "0")
    assert time.time() < sent + 5, "the broker checks took too long to prove anything"
    ran = result.get(timeout=15)
    assert sent + 5 <= ran <= sent + 5 + SOON


def test_an_eta_task_runs_at_its_eta(tasks: SimpleNamespace, tmp_path: Path,
                                     start_worker: Callable[..., WorkerProcess]) -> None:
    start_worker()
    eta = datetime.now(timezone.utc) + timedelta(seconds=2)
    ran = tasks.stamp.apply_async((str(tmp_path / "s"), "t"), eta=eta).get(timeout=15)
    assert eta.timestamp() <= ran <= eta.timestamp() + SOON


def test_a_naive_eta_is_refused_and_nothing_is_sent(tasks: SimpleNamespace, broker: Broker,
                                                    queue: str) -> None:
    with pytest.raises(taskq.ConfigurationError, match="timezone-aware"):
        tasks.add.apply_async((1, 2), eta=datetime.now() + timedelta(seconds=5))
    with pytest.raises(taskq.ConfigurationError, match="countdown must be"):
        tasks.add.apply_async((1, 2), countdown=-1)
    assert not broker.exists(queue)


@pytest.mark.rabbitmq
def test_a_thousand_different_countdowns_use_a_fixed_set_of_queues(
        tasks: SimpleNamespace, broker: Broker, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given 1,000 tasks with 1,000 different countdowns (0.5s to 1.5s in 1 ms steps), the
    broker uses the same fixed set of delay queues, and every task runs once, none early."""
    path = tmp_path / "stamps"
    sent: dict[str, float] = {}
    results = []
    for k in range(1000):
        token = f"t{k}"
        sent[token] = time.time() + 0.5 + k / 1000
        results.append(tasks.stamp.apply_async((str(path), token), countdown=0.5 + k / 1000))
    queues, _ = delayed_counts(broker)
    assert queues == 36
    start_worker()
    for result in results:
        result.get(timeout=60)
    ran = stamps(path)
    assert len(lines(path)) == 2000 and set(ran) == set(sent)  # each ran exactly once
    early = [t for t in sent if ran[t] < sent[t] - 0.005]
    assert not early, f"{len(early)} ran before their countdown, e.g. {early[:3]}"
    assert delayed_counts(broker)[0] == 36


@pytest.mark.slow
@pytest.mark.rabbitmq
def test_delayed_tasks_survive_a_worker_kill_and_a_broker_restart(
        tasks: SimpleNamespace, broker: Broker, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given tasks delayed by 6s, when the worker is killed (-9) and RabbitMQ restarted while
    they wait, a new worker runs each exactly once, at or after its due time."""
    worker = start_worker()
    path = tmp_path / "stamps"
    sent = time.time()
    results = [tasks.stamp.apply_async((str(path), f"t{i}"), countdown=6) for i in range(20)]
    worker.kill()
    broker.restart()
    start_worker()
    for result in results:
        result.get(timeout=40)
    ran = stamps(path)
    assert len(lines(path)) == 40 and len(ran) == 20
    assert min(ran.values()) >= sent + 6


@pytest.mark.rabbitmq
def test_delayed_tasks_reach_a_queue_that_was_deleted_and_declared_again(
        tasks: SimpleNamespace, broker: Broker, queue: str,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Deleting a queue drops its binding to the delay ladder. The client that bound it once
    does not know; the worker that declares the queue again binds it again, so delayed tasks
    sent afterwards still arrive instead of vanishing at the end of the ladder."""
    worker = start_worker(concurrency=1)
    assert tasks.add.apply_async((1, 1), countdown=0.1).get(timeout=10) == 2
    broker.delete_queue(queue)  # the broker cancels the worker's consumer: it reconnects
    worker.wait_ready()
    assert tasks.add.apply_async((2, 2), countdown=0.1).get(timeout=10) == 4


def test_an_expired_task_is_not_run_and_its_caller_is_told(
        tasks: SimpleNamespace, broker: Broker, queue: str, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given a task that expires in 1s but is only due in 2s, the worker does not run it, the
    caller gets TaskExpired, and the message is kept in the dead-letter queue with the reason."""
    start_worker()
    path = tmp_path / "ran"
    result = tasks.record.apply_async((str(path), "x"), countdown=2, expires=1)
    with pytest.raises(taskq.TaskExpired, match="expired at"):
        result.get(timeout=15)
    assert not path.exists()
    [letter] = broker.take_dead_letters(queue)
    assert letter.exception == "TaskExpired" and letter.headers["id"] == result.id


def test_expires_as_a_datetime_and_an_unexpired_task_runs(
        tasks: SimpleNamespace, start_worker: Callable[..., WorkerProcess]) -> None:
    start_worker()
    later = datetime.now(timezone.utc) + timedelta(minutes=5)
    assert tasks.add.apply_async((1, 2), expires=later).get(timeout=10) == 3
    assert tasks.add.apply_async((1, 2), expires=30).get(timeout=10) == 3


def test_no_worker_when_it_is_due_means_it_waits_in_the_queue(
        tasks: SimpleNamespace, broker: Broker, queue: str) -> None:
    """A due task with no worker running is an ordinary ready message in its work queue."""
    tasks.add.apply_async((1, 2), countdown=0.3)
    wait_for(lambda: broker.exists(queue) and broker.counts(queue)[0] == 1, 10,
             "the due task to reach its queue")
