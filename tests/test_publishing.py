"""Publishing: durable, persistent, confirmed, mandatory; safe from threads and after fork."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace

import pytest

import taskq
from taskq import App

from .apps import basic
from .support import Broker, WorkerProcess, wait_for


@pytest.mark.rabbitmq
def test_a_task_message_is_durable_persistent_and_speaks_protocol_v2(
        tasks: SimpleNamespace, broker: Broker, queue: str) -> None:
    """Given no worker, when a task is sent, the broker holds it in a durable queue, as a
    persistent protocol-v2 message."""
    result = tasks.add.delay(2, 3)
    info = broker.queue_info(queue)
    assert info["durable"] == "true"
    # Its one argument: what the broker itself expires goes to the dead letters.
    assert info["arguments"] == ('[{"x-dead-letter-exchange",[]},'
                                 f'{{"x-dead-letter-routing-key","{queue}.dlq"}}]')
    assert info["messages_ready"] == "1"
    [message] = broker.peek_all(queue)
    props = message.properties
    assert props["delivery_mode"] == 2
    assert props["content_type"] == "application/json"
    assert props["correlation_id"] == result.id
    assert props["reply_to"] == tasks.app.replies.queue
    headers = props["application_headers"]
    assert headers["task"] == "tests.apps.basic.add" and headers["id"] == result.id
    assert headers["lang"] == "py"
    # Headers holding their default are left out (Celery reads them with .get() and it).
    assert not {"root_id", "parent_id", "group", "eta", "retries", "argsrepr"} & set(headers)
    args, kwargs, embed = json.loads(message.body)
    assert (args, kwargs) == ([2, 3], {})
    assert set(embed) == {"callbacks", "errbacks", "chain", "chord"}


@pytest.mark.rabbitmq
def test_delay_waits_for_the_confirm_and_a_nack_is_an_error(
        make_app: Callable[..., App], broker: Broker, queue: str) -> None:
    """Given a queue that refuses messages (full, reject-publish), ``.delay()`` raises
    MessageNacked: it reports the broker's answer, not just that the bytes were written."""
    with broker.channel() as ch:
        ch.queue_declare(queue, durable=True, auto_delete=False,
                         arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    tasks = basic.build(make_app())
    with pytest.raises(taskq.MessageNacked, match="refused task"):
        tasks.add.delay(1, 2)


@pytest.mark.rabbitmq
def test_an_unroutable_message_is_an_error_not_a_silent_drop(
        tasks: SimpleNamespace, broker: Broker, queue: str) -> None:
    """Given the queue was deleted behind taskq's back, the next send is returned by the broker
    (mandatory) and raises Unroutable; the send after that declares the queue again."""
    tasks.add.delay(1, 1)
    broker.delete_queue(queue)
    with pytest.raises(taskq.Unroutable, match=queue):
        tasks.add.delay(1, 2)
    tasks.add.delay(1, 3)
    assert broker.counts(queue)[0] == 1


def test_many_threads_send_and_wait_at_once(
        tasks: SimpleNamespace, start_worker: Callable[..., WorkerProcess]) -> None:
    """Given 8 threads each sending 25 tasks and waiting for them, every result is right."""
    start_worker()
    errors: list[BaseException] = []
    totals: dict[int, int] = {}

    def client(n: int) -> None:
        try:
            results = [tasks.add.delay(n, i) for i in range(25)]
            totals[n] = sum(r.get(timeout=30) for r in results)
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert totals == {n: 25 * n + sum(range(25)) for n in range(8)}


def test_sending_and_waiting_work_in_a_forked_child(
        tasks: SimpleNamespace, start_worker: Callable[..., WorkerProcess]) -> None:
    """Given a process that already sent tasks (open connections, a reply queue), a forked child
    sends and receives on its own, and the parent keeps working undisturbed."""
    start_worker()
    assert tasks.add.delay(1, 1).get(timeout=10) == 2
    before_fork = tasks.add.delay(10, 10)
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            if tasks.add.delay(20, 22).get(timeout=20) == 42:
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert before_fork.get(timeout=10) == 20
    assert tasks.add.delay(2, 2).get(timeout=10) == 4


def test_forking_while_another_thread_sends_never_hangs_the_child(
        tasks: SimpleNamespace, start_worker: Callable[..., WorkerProcess]) -> None:
    """Given four threads sending tasks in a loop (taking the producer's pool lock and the
    result listener's locks all the time), when the main thread forks 40 times, every child
    can send and get a result within its bound: none inherits a lock a parent thread held."""
    start_worker()
    stop = threading.Event()
    sent: list[int] = []

    def send_in_a_loop() -> None:
        while not stop.is_set():
            sent.append(tasks.add.delay(1, 1).get(timeout=20))

    senders = [threading.Thread(target=send_in_a_loop, daemon=True) for _ in range(4)]
    for sender in senders:
        sender.start()
    try:
        wait_for(lambda: len(sent) >= 12, 20, "the sending threads to get going")
        for attempt in range(40):
            pid = os.fork()
            if pid == 0:  # the child: a hang here is the defect; the parent's bound ends it
                code = 1
                try:
                    tasks.add.apply_async((0, 0), ignore_result=True)
                    if tasks.add.delay(attempt, 1).get(timeout=15) == attempt + 1:
                        code = 0
                finally:
                    os._exit(code)
            deadline = time.monotonic() + 30
            while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    raise AssertionError(f"child {attempt} hung after fork")
                time.sleep(0.01)
            assert os.waitstatus_to_exitcode(done[1]) == 0, f"child {attempt} failed"
    finally:
        stop.set()
        for sender in senders:
            sender.join(30)
    assert set(sent) == {2}


def test_a_child_forked_while_a_parent_thread_holds_taskqs_locks_still_sends(
        tasks: SimpleNamespace, start_worker: Callable[..., WorkerProcess]) -> None:
    """The race above, made certain: a parent thread holds the producer's pool lock, the
    app's lock and the result listener's locks across the fork. The child (which inherits
    them held, by a thread it does not have) still sends and gets its result."""
    start_worker()
    app = tasks.app
    assert tasks.add.delay(1, 1).get(timeout=10) == 2
    locks = [app._lock, app.producer._lock, app.replies._registry, app.replies._cond]
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        for lock in locks:
            lock.acquire()
        holding.set()
        release.wait(30)
        for lock in reversed(locks):
            lock.release()

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert holding.wait(10)
    try:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:  # fire-and-forget first (no result listener), then with a result
                tasks.add.apply_async((0, 0), ignore_result=True)
                if tasks.add.delay(2, 3).get(timeout=15) == 5:
                    code = 0
            finally:
                os._exit(code)
        deadline = time.monotonic() + 30
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError("the child hung on a lock it inherited held")
            time.sleep(0.01)
        assert os.waitstatus_to_exitcode(done[1]) == 0
    finally:
        release.set()
        holder.join(10)
    assert tasks.add.delay(3, 3).get(timeout=10) == 6


def test_a_result_handle_from_before_fork_fails_clearly_in_the_child(
        tasks: SimpleNamespace, start_worker: Callable[..., WorkerProcess]) -> None:
    """A pending handle copied into a forked child can never be filled there (the result goes
    to the parent's reply queue), so get() says so instead of waiting out its timeout."""
    handle = tasks.add.delay(1, 2)  # no worker yet: certainly pending at the fork
    pid = os.fork()
    if pid == 0:
        try:
            handle.get(timeout=5)
        except taskq.BrokerUnavailable as exc:
            os._exit(0 if "another process" in str(exc) else 2)
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    start_worker()
    assert handle.get(timeout=10) == 3
