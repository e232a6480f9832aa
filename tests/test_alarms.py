"""RabbitMQ's memory alarm, caused for real: it stops reading every connection that publishes.

Every wait on a blocked broker is bounded; workers keep taking, running and acking tasks,
with results or not, and pay what they owe (results, dead letters) once the alarm clears.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

import taskq
from taskq import App

from .apps import basic
from .support import Broker, WorkerProcess, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.rabbitmq]


def test_a_delay_many_of_large_messages_into_a_blocked_broker_ends_within_its_bound(
        memory_alarm: Callable[[bool], None], make_app: Callable[..., App], broker: Broker,
        queue: str) -> None:
    """Given a connected client and a memory alarm, a delay_many of 100 one-megabyte messages
    (more than the socket buffers hold, so a write blocks) raises BatchPublishError naming
    what was not queued, within its publish_timeout, instead of hanging in a write."""
    tasks = basic.build(make_app(publish_timeout=3))
    tasks.echo.apply_async(("warm",), ignore_result=True)  # connected, queue declared
    memory_alarm(True)
    started = time.monotonic()
    with pytest.raises(taskq.BatchPublishError) as caught:
        tasks.echo.delay_many([("x" * 1_000_000,)] * 100)
    elapsed = time.monotonic() - started
    assert elapsed < 3 + 3, f"took {elapsed:.1f}s"
    assert len(caught.value.failed) >= 1
    memory_alarm(False)
    assert broker.counts(queue)[0] <= 1 + 100 - len(caught.value.failed)


def test_tasks_with_results_keep_being_acked_during_an_alarm(
        memory_alarm: Callable[[bool], None], make_app: Callable[..., App], broker: Broker,
        queue: str, tmp_path: Path, start_worker: Callable[..., WorkerProcess]) -> None:
    """Given 20 queued tasks that return values and a memory alarm, a worker runs and acks
    all of them while the alarm lasts (their results wait in its spool), and once the alarm
    clears every caller gets its value; nothing is left in the queue or in the spool."""
    tasks = basic.build(make_app())
    effects = tmp_path / "effects"
    results = [tasks.record.delay(str(effects), f"t{i}") for i in range(20)]
    memory_alarm(True)
    worker = start_worker(concurrency=2)
    wait_for(lambda: broker.queue_info(queue)["messages_ready"] == "0"
             and broker.queue_info(queue)["messages_unacknowledged"] == "0", 30,
             "every task to be run and acked during the alarm")
    assert len(effects.read_text().split()) == 20
    assert "wait in this worker's spool" in worker.log()
    memory_alarm(False)
    assert [r.get(timeout=30) for r in results] == [f"t{i}" for i in range(20)]
    wait_for(lambda: not list((tmp_path / "worker-state").rglob("*.spool")), 10,
             "the spool to be emptied")


def test_dead_letters_during_an_alarm_are_kept_and_answered_once_it_clears(
        memory_alarm: Callable[[bool], None], make_app: Callable[..., App], broker: Broker,
        queue: str, start_worker: Callable[..., WorkerProcess]) -> None:
    """A message no task of the worker's can run, during an alarm: acked at once, its dead
    letter and its caller's answer kept in the spool and delivered when the alarm clears."""
    tasks = basic.build(make_app())
    first = tasks.app.send_task("no.such.task", (1,))
    second = tasks.app.send_task("no.such.task", (2,))
    memory_alarm(True)
    start_worker(concurrency=1)
    wait_for(lambda: broker.queue_info(queue)["messages_ready"] == "0"
             and broker.queue_info(queue)["messages_unacknowledged"] == "0", 30,
             "both messages to be settled during the alarm")
    memory_alarm(False)
    for result in (first, second):
        with pytest.raises(taskq.NotRegistered):
            result.get(timeout=30)
    wait_for(lambda: broker.exists(f"{queue}.dlq") and broker.counts(f"{queue}.dlq")[0] == 2,
             15, "both dead letters")
