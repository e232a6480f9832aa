"""Topic routing: ``apply_async(routing_key=...)`` reaches every queue bound to a matching
pattern (``taskq worker -Q orders --bind 'eu.orders.*'``); RabbitMQ's topic rules on both
brokers; an unroutable send is an error (real broker and workers, both brokers)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import amqp
import pytest

import taskq
from taskq import App
from taskq.routing import topic_matches

from .apps import basic
from .support import Broker, RabbitBroker, WorkerProcess, lines, unique, wait_for


@pytest.fixture
def tag() -> str:
    """A first word no other test's keys and patterns have: bindings outlive their tests."""
    return unique("t").replace("-", "")


def _count(broker: Broker, queue: str) -> int:
    return broker.counts(queue)[0] if broker.exists(queue) else 0


def test_a_task_sent_by_routing_key_reaches_the_bound_queue_and_its_worker(
        make_app: Callable[..., App], broker: Broker, queue: str, tmp_path: Path, tag: str,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given a worker of <queue> bound to 'eu.orders.*', when a task is sent with routing key
    'eu.orders.created', then that worker runs it once; the binding stays after the worker
    stops, so a task sent meanwhile waits in <queue> for the next worker."""
    tasks = basic.build(make_app())
    path = tmp_path / "ran"
    worker = start_worker("--bind", f"{tag}.orders.*", "--bind", f"{tag}.refunds.#")
    assert f"bound to routing keys matching {tag}.orders.*, {tag}.refunds.#" in worker.log()
    first = tasks.record.apply_async((str(path), "first"), routing_key=f"{tag}.orders.created")
    assert first.get(timeout=15) == "first"
    worker.stop()
    later = tasks.record.apply_async((str(path), "later"), routing_key=f"{tag}.refunds.a.b")
    assert _count(broker, queue) == 1
    start_worker()  # no --bind: the queue's binding is the broker's
    assert later.get(timeout=15) == "later"
    assert lines(path) == ["first", "later"]
    assert _count(broker, queue) == 0 and broker.dead_letter_count(queue) == 0


def test_a_key_reaches_each_queue_it_matches_once(
        make_app: Callable[..., App], broker: Broker, queue: str, tmp_path: Path, tag: str,
        start_worker: Callable[..., WorkerProcess]) -> None:
    eu, audit = f"{queue}-eu", f"{queue}-audit"
    tasks = basic.build(make_app())
    start_worker("--bind", f"{tag}.eu.#", queues=[eu])
    start_worker("--bind", f"{tag}.*.orders.*", queues=[audit])
    path = tmp_path / "ran"
    both = tasks.record.apply_async((str(path), "both"), routing_key=f"{tag}.eu.orders.new")
    only_eu = tasks.record.apply_async((str(path), "eu"), routing_key=f"{tag}.eu.refunds")
    assert both.get(timeout=15) == "both" and only_eu.get(timeout=15) == "eu"
    wait_for(lambda: len(lines(path)) == 3, 15, "the second copy to run")
    assert sorted(lines(path)) == ["both", "both", "eu"]  # a copy per matching queue
    assert (_count(broker, eu), _count(broker, audit)) == (0, 0)


def test_a_key_no_binding_matches_is_unroutable_and_nothing_is_queued(
        make_app: Callable[..., App], broker: Broker, queue: str, tag: str,
        start_worker: Callable[..., WorkerProcess]) -> None:
    tasks = basic.build(make_app())
    start_worker("--bind", f"{tag}.eu.orders.*")
    with pytest.raises(taskq.Unroutable, match="no queue is bound to a pattern that routing key "
                       f"'{tag}.us.orders.created' matches"):
        tasks.add.apply_async((1, 1), routing_key=f"{tag}.us.orders.created")
    with pytest.raises(taskq.BatchPublishError) as caught, tasks.app.batch():
        kept = tasks.add.apply_async((1, 2), routing_key=f"{tag}.eu.orders.x")
        lost = tasks.add.apply_async((1, 3), routing_key=f"{tag}.nowhere")
    assert caught.value.failed == [lost.id]
    assert kept.get(timeout=15) == 3
    assert _count(broker, queue) == 0 and broker.dead_letter_count(queue) == 0


def test_a_route_can_name_a_routing_key(
        make_app: Callable[..., App], tag: str,
        start_worker: Callable[..., WorkerProcess]) -> None:
    app = make_app(routes={"tests.apps.basic.add": {"routing_key": f"{tag}.sums"}})
    start_worker("--bind", f"{tag}.*")
    assert basic.build(app).add.delay(2, 2).get(timeout=15) == 4


def test_routing_key_mistakes_are_clear_errors(make_app: Callable[..., App]) -> None:
    tasks = basic.build(make_app())
    with pytest.raises(taskq.ConfigurationError, match="can't be delayed"):
        tasks.add.apply_async((1, 1), routing_key="eu.x", countdown=5)
    with pytest.raises(taskq.ConfigurationError, match="not both"):
        tasks.add.apply_async((1, 1), routing_key="eu.x", queue="q")
    with pytest.raises(taskq.ConfigurationError, match="routing_key must be a non-empty"):
        tasks.add.apply_async((1, 1), routing_key="")


PATTERNS = ["a.b", "a.*", "*.b", "#", "a.#", "#.b", "a.#.b", "*.*", "a.*.#", "#.a.#", "*"]
KEYS = ["a", "b", "a.b", "a.c", "c.b", "a.b.b", "a.x.y.b", "b.a", "a.a.a"]


@pytest.mark.rabbitmq
def test_the_embedded_broker_matches_keys_as_rabbitmq_does(broker: RabbitBroker) -> None:
    """Each pattern bound to a queue of its own on a topic exchange; each key published
    once; what RabbitMQ routed is what topic_matches says."""
    exchange = unique("topic-rules")
    queues = {pattern: unique("rule") for pattern in PATTERNS}
    with broker.channel() as channel:
        channel.exchange_declare(exchange, "topic", auto_delete=True)
        for pattern, name in queues.items():
            channel.queue_declare(name, exclusive=True)
            channel.queue_bind(name, exchange, routing_key=pattern)
        for key in KEYS:
            channel.basic_publish(amqp.Message(key), exchange=exchange, routing_key=key)
        routed = set()
        for pattern, name in queues.items():
            while (message := channel.basic_get(name, no_ack=True)) is not None:
                routed.add((pattern, message.body if isinstance(message.body, str)
                            else message.body.decode()))
    expected = {(p, k) for p, k in itertools.product(PATTERNS, KEYS) if topic_matches(p, k)}
    assert routed == expected
