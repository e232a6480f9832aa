"""Bad input at the worker is kept and answered: dead-lettered with a reason, caller told at once.

Each case sends a message a correct taskq client would never send (raw AMQP, or a task name /
arguments the worker can't use) and checks three things: the caller's get() fails fast with a
clear error, the message sits in ``<queue>.dlq`` with the reason, and the worker keeps serving.
"""

from __future__ import annotations

import json
import pickle
import uuid
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import taskq
from taskq import AsyncResult

from .support import Broker, WorkerProcess, run_taskq, wait_for

FAST = 10  # seconds: "at once", compared with the caller's own timeout


@pytest.fixture
def worker(start_worker: Callable[..., WorkerProcess]) -> WorkerProcess:
    return start_worker(concurrency=1)


def _raw_task(tasks: SimpleNamespace, broker: Broker, queue: str, body: bytes,
              content_type: str | None, task_name: str | None = "tests.apps.basic.add",
              ) -> AsyncResult[Any]:
    """Publish a hand-made message with our reply queue; return a handle on its result."""
    app = tasks.app
    task_id = str(uuid.uuid4())
    pending = app.replies.expect(task_id)
    headers = {"id": task_id, **({"task": task_name} if task_name else {})}
    properties: dict[str, Any] = {"correlation_id": task_id, "reply_to": app.replies.queue,
                                  "application_headers": headers, "delivery_mode": 2}
    if content_type:
        properties["content_type"] = content_type
    broker.publish_raw(queue, body, **properties)
    return AsyncResult(task_id, task_name or "?", pending, app.replies)


def _dead_letter(broker: Broker, queue: str, task_id: str) -> dict[str, Any]:
    """The letter's body, headers, and why (as x-taskq-dead-* keys, as on RabbitMQ)."""
    for letter in broker.take_dead_letters(queue):
        if letter.correlation_id == task_id:
            return {"body": letter.body, **letter.headers,
                    "x-taskq-dead-exception": letter.exception,
                    "x-taskq-dead-reason": letter.reason,
                    "x-taskq-original-queue": letter.original_queue,
                    "x-taskq-dead-at": letter.dead_at}
    raise AssertionError(f"task {task_id} is not in {queue}.dlq")


def _still_serving(tasks: SimpleNamespace, worker: WorkerProcess) -> None:
    assert worker.proc.poll() is None
    assert tasks.add.delay(20, 22).get(timeout=FAST) == 42


def test_an_undecodable_body(tasks: SimpleNamespace, broker: Broker, queue: str,
                             worker: WorkerProcess) -> None:
    result = _raw_task(tasks, broker, queue, b"\x80 not json {", "application/json")
    with pytest.raises(taskq.MessageDecodeError, match="cannot decode"):
        result.get(timeout=FAST)
    letter = _dead_letter(broker, queue, result.id)
    assert letter["body"] == b"\x80 not json {"
    assert letter["x-taskq-dead-exception"] == "MessageDecodeError"
    assert "cannot decode" in letter["x-taskq-dead-reason"]
    assert letter["x-taskq-original-queue"] == queue and letter["x-taskq-dead-at"]
    _still_serving(tasks, worker)


class _Trap:
    """Unpickling this creates a file: proof that a worker unpickled a message."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.path),))


def test_a_pickle_message_is_refused_without_unpickling(
        tasks: SimpleNamespace, broker: Broker, queue: str, worker: WorkerProcess,
        tmp_path: Path) -> None:
    trap = tmp_path / "unpickled"
    body = pickle.dumps([[_Trap(str(trap))], {}, {}])
    result = _raw_task(tasks, broker, queue, body, "application/x-python-serialize")
    with pytest.raises(taskq.ContentDisallowed, match="application/x-python-serialize"):
        result.get(timeout=FAST)
    assert not trap.exists()
    letter = _dead_letter(broker, queue, result.id)
    assert letter["x-taskq-dead-exception"] == "ContentDisallowed"
    assert letter["body"] == body
    _still_serving(tasks, worker)


def test_an_unknown_task_name(tasks: SimpleNamespace, broker: Broker, queue: str,
                              worker: WorkerProcess) -> None:
    result = tasks.app.send_task("no.such.task", (1,))
    with pytest.raises(taskq.NotRegistered, match=r"no task named 'no.such.task'"):
        result.get(timeout=FAST)
    letter = _dead_letter(broker, queue, result.id)
    assert letter["task"] == "no.such.task"
    assert "tests.apps.basic.add" in letter["x-taskq-dead-reason"]  # says what it does serve
    _still_serving(tasks, worker)


def test_arguments_that_do_not_fit_the_function(tasks: SimpleNamespace, broker: Broker,
                                                queue: str, worker: WorkerProcess) -> None:
    result = tasks.app.send_task("tests.apps.basic.add", (1,), {"z": 2})
    with pytest.raises(TypeError, match=r"arguments do not fit tests.apps.basic.add\(x, y\)"):
        result.get(timeout=FAST)
    letter = _dead_letter(broker, queue, result.id)
    assert letter["x-taskq-dead-exception"] == "TypeError"
    assert json.loads(letter["body"])[:2] == [[1], {"z": 2}]
    _still_serving(tasks, worker)


def test_a_message_that_is_not_a_task_message(tasks: SimpleNamespace, broker: Broker,
                                              queue: str, worker: WorkerProcess) -> None:
    result = _raw_task(tasks, broker, queue, b"[[], {}, {}]", "application/json", task_name=None)
    with pytest.raises(taskq.MessageDecodeError, match="no 'task' header"):
        result.get(timeout=FAST)
    _dead_letter(broker, queue, result.id)
    _still_serving(tasks, worker)


def test_bad_input_without_reply_to_is_still_kept(tasks: SimpleNamespace, broker: Broker,
                                                  queue: str, worker: WorkerProcess) -> None:
    """Given nobody waits for it, a bad message is still dead-lettered, not dropped."""
    task_id = str(uuid.uuid4())
    broker.publish_raw(queue, b"garbage", content_type="application/json",
                       correlation_id=task_id, delivery_mode=2,
                       application_headers={"task": "tests.apps.basic.add", "id": task_id})
    _still_serving(tasks, worker)  # processed in order: the bad one came first
    assert _dead_letter(broker, queue, task_id)["x-taskq-dead-exception"] == "MessageDecodeError"


@pytest.mark.rabbitmq
def test_a_message_the_broker_expires_in_its_queue_is_kept_with_the_reason(
        tasks: SimpleNamespace, broker: Broker, queue: str) -> None:
    """Given a task message with a per-message expiration (a Celery client's ``expires``)
    that passes while it waits in its queue with no worker, the broker moves it to the
    dead-letter queue instead of dropping it, and ``taskq dlq`` says why."""
    tasks.add.apply_async((0, 0), ignore_result=True)  # the queue, as taskq declares it
    assert len(broker.get_all(queue)) == 1  # (the broker expires messages at the head only)
    task_id = str(uuid.uuid4())
    broker.publish_raw(queue, json.dumps([[1, 2], {}, {}]).encode(),
                       content_type="application/json", correlation_id=task_id,
                       expiration="50", delivery_mode=2,
                       application_headers={"task": "tests.apps.basic.add", "id": task_id})
    wait_for(lambda: broker.exists(f"{queue}.dlq") and broker.counts(f"{queue}.dlq")[0] == 1,
             10, "the expired message in the dead-letter queue")
    assert broker.counts(queue)[0] == 0
    result = run_taskq("dlq", "show", task_id, "-Q", queue, env={"TASKQ_BROKER_URL": broker.url})
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(":", 1) for line in result.stdout.splitlines())
    assert fields["exception"].strip() == "expired"
    assert "per-message expiration passed" in fields["reason"]
    assert fields["dead at"].strip().startswith("20")
