"""Results over reply_to: any number outstanding, any order, any thread; failures rebuilt safely."""

from __future__ import annotations

import builtins
import json
import random
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

import taskq
from taskq import AsyncResult

from .support import Broker, WorkerProcess, wait_for


@pytest.fixture
def worker(start_worker: Callable[..., WorkerProcess]) -> WorkerProcess:
    return start_worker()


def test_many_outstanding_results_waited_on_in_any_order(
        tasks: SimpleNamespace, worker: WorkerProcess) -> None:
    results = [(i, tasks.add.delay(i, i)) for i in range(200)]
    random.shuffle(results)
    assert all(r.get(timeout=30) == 2 * i for i, r in results)


def test_a_result_that_arrives_before_anyone_waits_is_kept(
        tasks: SimpleNamespace, worker: WorkerProcess) -> None:
    result = tasks.echo.delay({"k": [1, 2]})
    wait_for(result.ready, 10, "the result to arrive")
    assert result.state == "SUCCESS"
    assert result.successful() and not result.failed()
    assert result.result == {"k": [1, 2]}
    assert result.get(timeout=0) == {"k": [1, 2]}


def test_results_are_waited_on_from_other_threads(
        tasks: SimpleNamespace, worker: WorkerProcess) -> None:
    results = [tasks.add.delay(i, 1) for i in range(40)]
    seen: dict[int, int] = {}

    def waiter(part: list[AsyncResult[int]]) -> None:
        for r in part:
            seen[id(r)] = r.get(timeout=30)

    threads = [threading.Thread(target=waiter, args=(results[k::4],)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(seen.values()) == [i + 1 for i in range(40)]


def test_many_threads_wait_on_one_result(tasks: SimpleNamespace, worker: WorkerProcess,
                                         tmp_path: Path) -> None:
    """Threads already waiting on the same result when it arrives all get it."""
    release = tmp_path / "release"
    result = tasks.wait_for_file.delay(str(release))
    got: list[int] = []
    threads = [threading.Thread(target=lambda: got.append(result.get(timeout=30)))
               for _ in range(4)]
    for t in threads:
        t.start()
    release.touch()
    for t in threads:
        t.join(60)
    assert len(got) == 4 and len(set(got)) == 1, got


def test_get_times_out_with_a_builtin_compatible_error(tasks: SimpleNamespace) -> None:
    """Given no worker, get(timeout) raises taskq.TimeoutError, a builtin TimeoutError."""
    result = tasks.add.delay(1, 2)
    assert result.state == "PENDING" and not result.ready() and result.result is None
    with pytest.raises(builtins.TimeoutError) as caught:
        result.get(timeout=0.3)
    assert isinstance(caught.value, taskq.TimeoutError)
    assert result.id in str(caught.value) and "PENDING" in str(caught.value)


def test_a_builtin_exception_is_raised_as_itself(
        tasks: SimpleNamespace, worker: WorkerProcess) -> None:
    result = tasks.fail.delay("ValueError", "bad value")
    with pytest.raises(ValueError, match="bad value") as caught:
        result.get(timeout=10)
    assert result.failed() and result.state == "FAILURE"
    assert "Traceback" in (result.traceback or "")
    assert "raise ValueError(message)" in "".join(getattr(caught.value, "__notes__", []))
    with pytest.raises(KeyError):
        tasks.fail.delay("KeyError", "k").get(timeout=10)


def test_other_exceptions_arrive_as_remote_error(
        tasks: SimpleNamespace, worker: WorkerProcess) -> None:
    with pytest.raises(taskq.RemoteError) as caught:
        tasks.fail.delay("Custom", "custom trouble").get(timeout=10)
    error = caught.value
    assert error.exc_type == "CustomError" and error.exc_module == "tests.apps.basic"
    assert error.exc_message == "custom trouble"
    assert "CustomError: custom trouble" in (error.remote_traceback or "")


def test_a_registered_exception_type_is_raised_as_itself(
        make_app: Callable[..., taskq.App], worker: WorkerProcess) -> None:
    """Given App(exceptions=[CustomError]), when the task raises CustomError('bad', 7), then
    get() raises CustomError with the same arguments and the worker's traceback in a note."""
    from .apps import basic

    tasks = basic.build(make_app(exceptions=[basic.CustomError]))
    with pytest.raises(basic.CustomError) as caught:
        tasks.fail.delay("Custom", "custom trouble").get(timeout=10)
    assert type(caught.value) is basic.CustomError
    assert caught.value.args == ("custom trouble",)
    assert "CustomError: custom trouble" in "".join(getattr(caught.value, "__notes__", []))


def test_app_exception_registers_a_type_as_a_decorator(
        make_app: Callable[..., taskq.App], worker: WorkerProcess) -> None:
    from .apps import basic

    app = make_app()
    assert app.exception(basic.CustomError) is basic.CustomError
    tasks = basic.build(app)
    with pytest.raises(basic.CustomError):
        tasks.fail.delay("Custom", "x").get(timeout=10)


def test_only_exception_types_can_be_registered(make_app: Callable[..., taskq.App]) -> None:
    with pytest.raises(taskq.ConfigurationError, match="must be Exception subclasses"):
        make_app(exceptions=[KeyboardInterrupt])
    with pytest.raises(taskq.ConfigurationError, match="must be Exception subclasses"):
        make_app().exception("tests.apps.basic.CustomError")  # type: ignore[arg-type]


def test_propagate_false_returns_the_exception(
        tasks: SimpleNamespace, worker: WorkerProcess) -> None:
    error = tasks.fail.delay("ValueError", "quiet").get(timeout=10, propagate=False)
    assert isinstance(error, ValueError) and str(error) == "quiet"


def test_a_return_value_json_cannot_carry_is_a_clear_failure(
        tasks: SimpleNamespace, worker: WorkerProcess) -> None:
    with pytest.raises(taskq.EncodeError, match=r"return value of tests.apps.basic.unserializable"):
        tasks.unserializable.delay().get(timeout=10)


def _send_result(broker: Broker, reply_to: str, task_id: str, payload: dict[str, object]) -> None:
    broker.publish_result(reply_to, task_id, json.dumps(payload).encode())


def test_a_result_naming_a_module_never_imports_it(tasks: SimpleNamespace,
                                                   broker: Broker) -> None:
    """Given a forged failure naming a module and a callable (Celery CVE-2021-23727), the
    caller gets a RemoteError and nothing is imported."""
    app = tasks.app
    task_id = str(uuid.uuid4())
    pending = app.replies.expect(task_id)
    handle: AsyncResult[object] = AsyncResult(task_id, "forged", pending, app.replies)
    module = f"evil_{uuid.uuid4().hex}"
    _send_result(broker, app.replies.queue, task_id, {
        "task_id": task_id, "status": "FAILURE", "traceback": None, "children": [],
        "result": {"exc_type": "system", "exc_module": module, "exc_message": ["touch /tmp/x"]},
    })
    with pytest.raises(taskq.RemoteError) as caught:
        handle.get(timeout=10)
    assert caught.value.exc_type == "system" and module not in sys.modules


def test_a_registered_type_is_matched_by_module_and_name_together(
        make_app: Callable[..., taskq.App], broker: Broker) -> None:
    """A failure naming CustomError of another module is not the registered CustomError."""
    from .apps import basic

    app = make_app(exceptions=[basic.CustomError])
    handles = {}
    for module in ("elsewhere", "tests.apps.basic"):
        task_id = str(uuid.uuid4())
        handles[module] = AsyncResult(task_id, "forged", app.replies.expect(task_id),
                                      app.replies, app.exceptions)
        _send_result(broker, app.replies.queue, task_id, {
            "task_id": task_id, "status": "FAILURE", "traceback": None, "children": [],
            "result": {"exc_type": "CustomError", "exc_module": module, "exc_message": ["m"]}})
    with pytest.raises(taskq.RemoteError):
        handles["elsewhere"].get(timeout=10)
    with pytest.raises(basic.CustomError):
        handles["tests.apps.basic"].get(timeout=10)


def test_a_result_is_delivered_once_even_if_sent_twice(tasks: SimpleNamespace,
                                                       broker: Broker) -> None:
    """At-least-once delivery may run a task twice; the caller sees the first result only."""
    app = tasks.app
    task_id = str(uuid.uuid4())
    pending = app.replies.expect(task_id)
    handle: AsyncResult[object] = AsyncResult(task_id, "twice", pending, app.replies)
    for value in ("first", "second"):
        _send_result(broker, app.replies.queue, task_id, {
            "task_id": task_id, "status": "SUCCESS", "result": value, "traceback": None,
            "children": []})
    assert handle.get(timeout=10) == "first"
    wait_for(lambda: broker.counts(app.replies.queue)[0] == 0, 10, "the duplicate to be consumed")
    assert handle.get(timeout=0) == "first"


@pytest.mark.rabbitmq
def test_the_result_message_is_what_celery_rpc_writes(
        broker: Broker, queue: str, worker: WorkerProcess) -> None:
    """Given a raw protocol-v2 message with our own reply_to, the worker's reply is Celery's
    rpc:// result format, matched by correlation_id."""
    reply = f"{queue}.reply"
    task_id = str(uuid.uuid4())
    with broker.channel() as ch:
        ch.queue_declare(reply, durable=False, auto_delete=False)
    broker.publish_raw(queue, json.dumps([[4, 5], {}, {}]).encode(),
                       content_type="application/json", content_encoding="utf-8",
                       correlation_id=task_id, reply_to=reply, delivery_mode=2,
                       application_headers={"task": "tests.apps.basic.add", "id": task_id})
    [message] = wait_for(lambda: broker.get_all(reply), 10, "the reply")
    assert message.properties["correlation_id"] == task_id
    body = json.loads(message.body)
    assert {"task_id", "status", "result", "traceback", "children"} <= set(body)
    assert (body["task_id"], body["status"], body["result"]) == (task_id, "SUCCESS", 9)
    broker.delete_queue(reply)


def test_an_app_can_send_again_after_close(tasks: SimpleNamespace, broker: Broker,
                                           worker: WorkerProcess) -> None:
    """close() deletes the reply queue at once; sending afterwards sets up a new one."""
    assert tasks.add.delay(1, 1).get(timeout=10) == 2
    old_queue = tasks.app.replies.queue
    tasks.app.close()
    assert not broker.exists(old_queue)
    assert tasks.add.delay(2, 2).get(timeout=10) == 4
    assert tasks.app.replies.queue != old_queue


def test_close_fails_the_results_still_awaited(tasks: SimpleNamespace) -> None:
    """No worker runs: after close() nothing can arrive for a pending handle, so get() says
    so at once instead of waiting forever."""
    result = tasks.add.delay(1, 1)
    tasks.app.close()
    started = time.monotonic()
    with pytest.raises(taskq.ResultUnavailable, match="closed"):
        result.get(timeout=30)
    assert time.monotonic() - started < 5


def test_values_larger_than_a_frame_travel_both_ways(tasks: SimpleNamespace,
                                                      worker: WorkerProcess) -> None:
    """A 300 kB argument and result span several AMQP frames (frame_max is 128 kB)."""
    big = "x" * 300_000 + "end"
    assert tasks.echo.delay(big).get(timeout=20) == big
