"""Faults on the broker side, caused for real: restarts, a crash, outages, alarms, conflicts."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

import taskq
from taskq import App

from .apps import basic
from .support import Broker, WorkerProcess, lines, rabbitmqctl, run_taskq, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.rabbitmq]


@contextlib.contextmanager
def broker_down(broker: Broker) -> Iterator[None]:
    """RabbitMQ's application stopped for the duration (connections refused), then started."""
    rabbitmqctl("stop_app")
    try:
        yield
    finally:
        rabbitmqctl("start_app")
        wait_for(broker._reachable, 60, "RabbitMQ to come back", interval=0.2)


def test_a_worker_rides_out_a_broker_restart(
        tasks: SimpleNamespace, broker: Broker, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given a worker running a task, when RabbitMQ restarts, the worker reconnects by itself
    (logging the outage once, not per retry), the interrupted task runs again, the caller
    gets its result, and tasks sent afterwards run as usual."""
    worker = start_worker(concurrency=2)
    pid_file, release = tmp_path / "pid", tmp_path / "release"
    running = tasks.pid_then_block.delay(str(pid_file), str(release))
    wait_for(pid_file.exists, 15, "the task to start")
    broker.restart()
    release.touch()
    assert running.get(timeout=30) == "released"
    assert [tasks.add.delay(i, i).get(timeout=30) for i in range(5)] == [0, 2, 4, 6, 8]
    # An idle slot may still be in its reconnect backoff (up to 5 s) after the other one
    # ran those: the worker says "reconnected" once both are back.
    wait_for(lambda: "reconnected to the broker" in worker.log(), 10, "both slots to reconnect")
    log = worker.log()
    assert worker.proc.poll() is None
    assert log.count("lost the connection to the broker") == 1, log
    assert log.count("reconnected to the broker") == 1, log


def _beam_pid() -> int:
    out = rabbitmqctl("eval", "os:getpid().")
    return int(out.strip().strip('"'))


def test_a_worker_and_a_client_ride_out_a_broker_crash(
        tasks: SimpleNamespace, broker: Broker, queue: str, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given 20 confirmed tasks queued, when the RabbitMQ process is killed (-9) and started
    again, nothing confirmed is lost: a worker that was running all along reconnects and
    runs them, and the caller's results arrive through its reply queue."""
    effects = tmp_path / "effects"
    worker = start_worker(queues=[f"{queue}-elsewhere"], concurrency=1)
    results = [tasks.record.delay(str(effects), f"t{i}") for i in range(20)]
    os.kill(_beam_pid(), signal.SIGKILL)
    subprocess.run(["rabbitmq-server", "-detached"], check=True, capture_output=True)
    wait_for(broker._reachable, 90, "RabbitMQ to start again", interval=0.5)
    rabbitmqctl("await_startup")
    assert broker.counts(queue)[0] == 20
    start_worker(concurrency=2)
    assert [r.get(timeout=60) for r in results] == [f"t{i}" for i in range(20)]
    assert sorted(lines(effects)) == sorted(f"t{i}" for i in range(20))
    wait_for(lambda: "reconnected to the broker" in worker.log(), 30,
             "the first worker to reconnect too")


def test_sending_while_the_broker_is_down_raises_within_its_bound(
        make_app: Callable[..., App], broker: Broker) -> None:
    """Given publish_timeout=2 and no broker, ``.delay()`` retries for 2s, then raises
    BrokerUnavailable naming the broker (password masked); it never reports success."""
    tasks = basic.build(make_app(publish_timeout=2))
    with broker_down(broker):
        started = time.monotonic()
        with pytest.raises(taskq.BrokerUnavailable) as caught:
            tasks.add.delay(1, 2)
        elapsed = time.monotonic() - started
    assert 2 <= elapsed < 5
    message = str(caught.value)
    assert "within 2s" in message and "guest:****@" in message and "guest:guest" not in message


def test_sending_during_a_short_outage_succeeds_once_the_broker_is_back(
        make_app: Callable[..., App], broker: Broker, queue: str) -> None:
    tasks = basic.build(make_app(publish_timeout=30))
    tasks.add.delay(0, 0)  # connected before the outage
    rabbitmqctl("stop_app")
    comes_back = threading.Timer(2.0, rabbitmqctl, args=("start_app",))
    comes_back.start()
    try:
        tasks.add.delay(1, 2)
    finally:
        comes_back.join()
    wait_for(broker._reachable, 30, "RabbitMQ to be back")
    assert broker.counts(queue)[0] == 2


def test_waiting_for_a_result_while_the_broker_is_away_fails_promptly_then_recovers(
        make_app: Callable[..., App], broker: Broker,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given publish_timeout=2, a get(timeout=60) during a long outage raises
    BrokerUnavailable within seconds, not after 60; once the broker is back, the same handle
    gets its result."""
    tasks = basic.build(make_app(publish_timeout=2))
    result = tasks.add.delay(20, 22)
    with broker_down(broker):
        started = time.monotonic()
        with pytest.raises(taskq.BrokerUnavailable, match="may still arrive"):
            result.get(timeout=60)
        assert time.monotonic() - started < 10
    start_worker()
    assert result.get(timeout=30) == 42


def test_a_deleted_reply_queue_fails_its_pending_results_at_once(
        tasks: SimpleNamespace, broker: Broker) -> None:
    result = tasks.add.delay(1, 2)  # no worker: it stays pending
    broker.delete_queue(tasks.app.replies.queue)
    started = time.monotonic()
    with pytest.raises(taskq.ResultUnavailable, match="reply queue .* was deleted"):
        result.get(timeout=60)
    assert time.monotonic() - started < 10
    assert tasks.add.delay(0, 0) is not None  # a new send works: the queue was declared again


def test_a_queue_declared_with_other_arguments_stops_the_worker_with_one_line(
        broker: Broker, queue: str) -> None:
    with broker.channel() as ch:
        ch.queue_declare(queue, durable=True, auto_delete=False,
                         arguments={"x-max-length": 10})
    started = time.monotonic()
    result = run_taskq("worker", "-A", "tests.apps.basic:app", "-Q", queue,
                       env={"TASKQ_BROKER_URL": broker.url}, timeout=30)
    assert time.monotonic() - started < 15
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [error] = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert f"queue '{queue}' already exists with different settings" in error
    assert "x-max-length" in error


def test_a_blocked_broker_fails_publishers_in_time_while_consumers_keep_acking(
        memory_alarm: Callable[[bool], None], make_app: Callable[..., App], broker: Broker,
        queue: str, tmp_path: Path, start_worker: Callable[..., WorkerProcess]) -> None:
    """Given a memory alarm, ``.delay()`` raises BrokerUnavailable within its bound saying the
    broker blocks publishers; a worker keeps consuming and acking the tasks already queued;
    once the alarm clears, sending and results work again."""
    tasks = basic.build(make_app(publish_timeout=2))
    effects = tmp_path / "effects"
    for i in range(10):
        tasks.record.apply_async((str(effects), f"q{i}"), ignore_result=True)
    memory_alarm(True)
    started = time.monotonic()
    with pytest.raises(taskq.BrokerUnavailable, match="blocking publishers"):
        tasks.add.delay(1, 2)
    assert time.monotonic() - started < 5
    start_worker(concurrency=2)
    wait_for(lambda: len(lines(effects)) == 10, 20, "the queued tasks to run during the alarm")
    wait_for(lambda: broker.counts(queue)[0] == 0, 10, "the queue to drain")
    memory_alarm(False)
    assert tasks.add.delay(1, 2).get(timeout=20) == 3


def test_killing_the_broker_connection_of_a_client_loses_no_result(
        tasks: SimpleNamespace, broker: Broker,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """The client's result listener reconnects to its (durable) reply queue by itself."""
    start_worker()
    results = [tasks.add.delay(i, 1) for i in range(20)]
    assert broker.close_connections("taskq client") == 1
    more = [tasks.add.delay(i, 2) for i in range(20)]
    assert [r.get(timeout=20) for r in results] == [i + 1 for i in range(20)]
    assert [r.get(timeout=20) for r in more] == [i + 2 for i in range(20)]
