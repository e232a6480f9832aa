"""The worker: prefetch 1 and manual acks, processes per slot, heartbeats while tasks run."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from .support import Broker, WorkerProcess, rabbitmqctl, wait_for


def test_a_busy_slot_holds_exactly_one_message_and_the_rest_wait_in_the_broker(
        tasks: SimpleNamespace, broker: Broker, queue: str, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given one slot busy with a long task and five more queued, the broker shows exactly one
    unacked message and five ready: the slot holds nothing it is not running."""
    start_worker(concurrency=1)
    pid_file, release = tmp_path / "pid", tmp_path / "release"
    blocker = tasks.pid_then_block.delay(str(pid_file), str(release))
    wait_for(pid_file.exists, 15, "the blocking task to start")
    queued = [tasks.add.delay(i, 1) for i in range(5)]
    info = broker.queue_info(queue)
    assert (info["messages_unacknowledged"], info["messages_ready"]) == ("1", "5")
    release.touch()
    assert blocker.get(timeout=15) == "released"
    assert [r.get(timeout=15) for r in queued] == [1, 2, 3, 4, 5]
    info = broker.queue_info(queue)
    assert (info["messages_unacknowledged"], info["messages_ready"]) == ("0", "0")


def test_two_slots_run_two_tasks_at_once_in_separate_processes(
        tasks: SimpleNamespace, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given -c 2, two tasks that each wait for the other both finish: they ran at the same
    time, in two processes that are not the worker's own (so CPU-bound tasks use 2 cores)."""
    worker = start_worker(concurrency=2)
    a = tasks.rendezvous.delay(str(tmp_path), "a", ["a", "b"])
    b = tasks.rendezvous.delay(str(tmp_path), "b", ["a", "b"])
    pids = {a.get(timeout=30), b.get(timeout=30)}
    assert len(pids) == 2 and worker.pid not in pids and os.getpid() not in pids


@pytest.mark.rabbitmq
def test_a_task_longer_than_three_heartbeats_completes_without_a_reconnect(
        tasks: SimpleNamespace, broker: Broker, queue: str,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given a 1s heartbeat, a 3.5s task completes, is acked once, and the connection that
    received it stays up (the broker would close it after missed heartbeats)."""
    worker = start_worker(app="tests.apps.heartbeat:app", concurrency=1)
    timeouts = rabbitmqctl("list_connections", "-q", "--no-table-headers", "vhost", "timeout")
    assert f"{broker.vhost}\t1" in timeouts  # the broker agreed to 1s heartbeats
    result = tasks.sleep_for.delay(3.5)
    assert result.get(timeout=20) == 3.5
    info = broker.queue_info(queue)
    assert (info["messages_ready"], info["messages_unacknowledged"]) == ("0", "0")
    log = worker.log()
    assert "lost the connection" not in log and "reconnected" not in log
    assert tasks.add.delay(1, 1).get(timeout=10) == 2  # the same slot still serves


def test_the_start_banner_names_broker_queues_concurrency_and_tasks(
        broker: Broker, queue: str, start_worker: Callable[..., WorkerProcess]) -> None:
    worker = start_worker(concurrency=2)
    log = worker.log()
    if broker.kind == "rabbitmq":
        assert f"amqp://guest:****@127.0.0.1:5672/{broker.vhost}" in log
        assert "guest:guest" not in log
    else:  # the file's absolute path: nothing hidden
        assert f"broker:      sqlite:///{broker.path} (embedded; synchronous=normal)" in log
    assert f"queues:      {queue} (dead letters: {queue}.dlq)" in log
    assert "concurrency: 2 (processes)" in log
    assert "tests.apps.basic.add" in log and "tests.apps.basic.record" in log


def test_a_worker_serves_several_queues(
        make_app: Callable[..., object], queue: str,
        start_worker: Callable[..., WorkerProcess]) -> None:
    from .apps import basic

    other = f"{queue}-other"
    start_worker(queues=[queue, other], concurrency=1)
    first = basic.build(make_app())
    second = basic.build(make_app(default_queue=other))
    assert first.add.delay(1, 2).get(timeout=10) == 3
    assert second.add.delay(3, 4).get(timeout=10) == 7


@pytest.mark.parametrize("first_type", [
    "classic", pytest.param("quorum", marks=pytest.mark.rabbitmq)])
def test_a_slot_on_several_queues_holds_one_message_and_serves_every_queue(
        first_type: str, make_app: Callable[..., object], broker: Broker, queue: str,
        tmp_path: Path, start_worker: Callable[..., WorkerProcess]) -> None:
    """Given one slot consuming three queues (the first a quorum queue, which refuses global
    QoS), all with work waiting, while a long task runs the broker shows one unacked message
    in all three queues together; afterwards every task on every queue completes."""
    from .apps import basic

    names = [queue, f"{queue}-b", f"{queue}-c"]
    if broker.kind == "rabbitmq":
        with broker.channel() as ch:
            ch.queue_declare(names[0], durable=True, auto_delete=False,
                             arguments={"x-queue-type": first_type})
    apps = [basic.build(make_app(default_queue=name)) for name in names]
    pid_file, release = tmp_path / "pid", tmp_path / "release"
    blocker = apps[1].pid_then_block.delay(str(pid_file), str(release))
    queued = [apps[i % 3].add.delay(i, 1) for i in range(12)]
    start_worker(queues=names, concurrency=1, ready=False)
    wait_for(pid_file.exists, 20, "the blocking task to start")
    held = [broker.queue_info(name) for name in names]
    assert sum(int(info["messages_unacknowledged"]) for info in held) == 1, held
    release.touch()
    assert blocker.get(timeout=15) == "released"
    assert [r.get(timeout=20) for r in queued] == [i + 1 for i in range(12)]
    for name in names:
        info = broker.queue_info(name)
        assert (info["messages_ready"], info["messages_unacknowledged"]) == ("0", "0"), (name, info)
