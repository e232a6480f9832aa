"""Sending many tasks at once: pipelined confirms, all-confirmed-or-named on return."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest

import taskq
from taskq import App

from .apps import basic
from .support import Broker, WorkerProcess, rabbitmqctl


def test_a_batch_is_sent_when_the_block_ends_and_every_message_is_confirmed(
        tasks: SimpleNamespace, broker: Broker, queue: str,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given 500 .delay() calls inside ``with app.batch():``, nothing is sent until the block
    ends; when it returns, the broker holds all 500; their results come back as usual."""
    with tasks.app.batch() as batch:
        results = [tasks.add.delay(i, i) for i in range(500)]
        assert len(batch) == 500 and not broker.exists(queue)
    assert broker.counts(queue)[0] == 500
    start_worker()
    assert [r.get(timeout=30) for r in results] == [2 * i for i in range(500)]


def test_delay_many_sends_one_task_per_argument_tuple(
        tasks: SimpleNamespace, broker: Broker, queue: str,
        start_worker: Callable[..., WorkerProcess]) -> None:
    results = tasks.add.delay_many((i, 1) for i in range(100))
    assert len(results) == 100 and broker.counts(queue)[0] == 100
    start_worker()
    assert [r.get(timeout=30) for r in results] == [i + 1 for i in range(100)]


def test_an_error_inside_the_block_sends_nothing(tasks: SimpleNamespace, broker: Broker,
                                                 queue: str) -> None:
    with pytest.raises(RuntimeError, match="changed my mind"), tasks.app.batch():
        tasks.add.delay(1, 2)
        tasks.add.delay(3, 4)
        raise RuntimeError("changed my mind")
    assert not broker.exists(queue)


def test_bad_arguments_in_a_batch_fail_at_the_call(tasks: SimpleNamespace, broker: Broker,
                                                   queue: str) -> None:
    with pytest.raises(TypeError, match="missing a required argument"), tasks.app.batch():
        tasks.add.delay(1, 2)
        tasks.add.delay(1)
    assert not broker.exists(queue)


@pytest.mark.rabbitmq
def test_messages_the_broker_refuses_are_named_and_the_rest_are_queued(
        make_app: Callable[..., App], broker: Broker, queue: str) -> None:
    """Given a queue that takes 5 messages and refuses more (reject-publish), a batch of 10
    raises BatchPublishError naming exactly the 5 the broker did not confirm."""
    with broker.channel() as ch:
        ch.queue_declare(queue, durable=True, auto_delete=False,
                         arguments={"x-max-length": 5, "x-overflow": "reject-publish"})
    tasks = basic.build(make_app())
    refused = pytest.raises(taskq.BatchPublishError, match="5 of 10 tasks were not queued")
    with refused as caught, tasks.app.batch():
        results = [tasks.add.delay(i, i) for i in range(10)]
    assert caught.value.failed == [r.id for r in results[5:]]
    assert broker.counts(queue)[0] == 5


@pytest.mark.rabbitmq
def test_a_batch_that_cannot_reach_the_broker_names_every_task(
        make_app: Callable[..., App]) -> None:
    app = make_app(publish_timeout=1)
    tasks = basic.build(app)
    rabbitmqctl("stop_app")
    try:
        with pytest.raises(taskq.BatchPublishError) as caught, app.batch():
            results = [tasks.echo.apply_async((i,), ignore_result=True) for i in range(20)]
    finally:
        rabbitmqctl("start_app")
    assert sorted(caught.value.failed) == sorted(r.id for r in results)
    assert isinstance(caught.value.__cause__, taskq.BrokerUnavailable)


def test_a_nested_batch_is_part_of_the_outer_one(tasks: SimpleNamespace, broker: Broker,
                                                 queue: str) -> None:
    with tasks.app.batch() as outer:
        tasks.add.delay(1, 1)
        with tasks.app.batch() as inner:
            tasks.add.delay(2, 2)
        assert inner is outer and not broker.exists(queue)
    assert broker.counts(queue)[0] == 2
