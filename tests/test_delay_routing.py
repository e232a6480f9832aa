"""A due message reaches exactly its own queue: one copy per send, however many queues.

taskq 0.1 bound every queue to the delay ladder's delivery exchange with a header named
``x-taskq-delay-target``, which RabbitMQ's headers exchange ignores (it skips binding
arguments starting with ``x-``), so every binding matched every message: each due message
was copied into every queue that had ever been a delay target. These tests count copies in
every queue, and executions per task.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import amqp
import pytest

from taskq import App

from .apps import basic
from .support import Broker, WorkerProcess, rabbitmqctl, unique, wait_for

LEGACY_EXCHANGE = "taskq.delay.deliver"
LEGACY_HEADER = "x-taskq-delay-target"

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
def queues(queue: str, broker: Broker) -> Iterator[list[str]]:
    names = [f"{queue}-{name}" for name in ("a", "b", "c")]
    yield names
    for name in names:
        for suffix in ("", ".dlq"):
            if broker.exists(name + suffix):
                broker.delete_queue(name + suffix)


def ladder_messages(broker: Broker) -> int:
    """Messages waiting in the delay queues of the test vhost (any version's)."""
    out = rabbitmqctl("list_queues", "-q", "--no-table-headers", "-p", broker.vhost, "name",
                      "messages")
    rows = [line.split("\t") for line in out.splitlines()]
    return sum(int(count) for name, count in rows if name.startswith("taskq.delay"))


def ready(broker: Broker, queue: str) -> int:
    return broker.counts(queue)[0] if broker.exists(queue) else 0


def test_each_due_message_reaches_only_its_own_queue(
        make_app: Callable[..., App], broker: Broker, queues: list[str]) -> None:
    """Given three queues and one delayed task sent to each, when all are due and the delay
    queues are empty again, each queue holds exactly its own task."""
    tasks = basic.build(make_app())
    sent = {q: tasks.add.apply_async((i, i), queue=q, countdown=0.01, ignore_result=True).id
            for i, q in enumerate(reversed(queues))}
    wait_for(lambda: ladder_messages(broker) == 0 and all(ready(broker, q) for q in queues),
             15, "every delayed task to fall due")
    for q in queues:
        [message] = broker.get_all(q)
        assert message.properties["correlation_id"] == sent[q]


def test_retrying_tasks_on_three_queues_run_once_per_attempt(
        make_app: Callable[..., App], broker: Broker, queues: list[str], tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given a worker on three queues and two tasks per queue that retry twice each (every
    retry is a delayed message), each task runs exactly three times, each caller gets its
    value, and nothing is left in any queue, dead-letter queue or delay queue."""
    tasks = basic.build(make_app())
    start_worker(queues=queues, concurrency=2)
    logs = {f"{q}-{n}": tmp_path / f"{q}-{n}.log" for q in queues for n in range(2)}
    results = {name: tasks.flaky.apply_async((str(log), 2), queue=name.rsplit("-", 1)[0])
               for name, log in logs.items()}
    assert {name: r.get(timeout=30) for name, r in results.items()} == {n: [2] for n in logs}
    wait_for(lambda: ladder_messages(broker) == 0, 10, "the delay queues to empty")
    for name, log in logs.items():
        runs = [line.split()[1] for line in log.read_text().splitlines()]
        assert runs == ["0", "1", "2"], (name, runs)
    for q in queues:
        info = broker.queue_info(q)
        assert (info["messages_ready"], info["messages_unacknowledged"]) == ("0", "0")
        assert ready(broker, f"{q}.dlq") == 0


@pytest.fixture
def legacy_bindings(broker: Broker, queues: list[str]) -> Iterator[None]:
    """What taskq 0.1 left on a broker: its delivery exchange, each queue bound catch-all."""
    with broker.channel() as ch:
        ch.exchange_declare(LEGACY_EXCHANGE, "headers", durable=True, auto_delete=False)
        for q in queues:
            ch.queue_declare(q, durable=True, auto_delete=False)
            ch.queue_bind(q, LEGACY_EXCHANGE, arguments={"x-match": "all", LEGACY_HEADER: q})
    yield
    with broker.channel() as ch:
        ch.exchange_delete(LEGACY_EXCHANGE)


def legacy_catch_alls(broker: Broker) -> list[str]:
    out = rabbitmqctl("list_bindings", "-q", "--no-table-headers", "-p", broker.vhost,
                      "source_name", "destination_name", "arguments")
    return [line for line in out.splitlines()
            if line.startswith(LEGACY_EXCHANGE + "\t") and "all-with-x" not in line]


def test_a_new_client_repairs_the_catch_all_bindings_of_an_older_version(
        legacy_bindings: None, make_app: Callable[..., App], broker: Broker,
        queues: list[str]) -> None:
    """Given a broker with taskq 0.1's catch-all bindings, when a new client sends delayed
    tasks to those queues, it replaces them: a new task and a task still on its way from
    the old version's delay queues each reach exactly their own queue."""
    assert len(legacy_catch_alls(broker)) == 3
    tasks = basic.build(make_app())
    for q in queues:
        tasks.add.apply_async((1, 1), queue=q, countdown=0.01, ignore_result=True)
    assert legacy_catch_alls(broker) == []
    old_id = unique("from-the-old-ladder")
    with broker.channel() as ch:  # an old version's delayed message, falling due now
        ch.basic_publish(amqp.Message(b"[[1, 2], {}, {}]", correlation_id=old_id,
                                      application_headers={LEGACY_HEADER: queues[0]}),
                         exchange=LEGACY_EXCHANGE)
    wait_for(lambda: ladder_messages(broker) == 0 and ready(broker, queues[0]) == 2, 15,
             "every delayed task to fall due")
    assert [ready(broker, q) for q in queues] == [2, 1, 1]
    assert old_id in [m.properties["correlation_id"] for m in broker.get_all(queues[0])]


def test_a_new_worker_repairs_the_catch_all_bindings_of_an_older_version(
        legacy_bindings: None, broker: Broker, queues: list[str],
        start_worker: Callable[..., WorkerProcess]) -> None:
    start_worker(queues=queues[:2], concurrency=1)
    assert [line.split("\t")[1] for line in legacy_catch_alls(broker)] == [queues[2]]
