"""Celery interop: taskq speaks Celery's task protocol v2 and its ``rpc://`` result format.

Both directions, against real processes on the real broker: a Celery client calling a
``taskq worker``, and a taskq client served by a ``celery worker`` (tests/apps/celery_peer.py,
which never imports taskq).  celery is a test-only dependency; taskq itself never imports it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import amqp
import pytest
from celery import Celery
from celery import chain as celery_chain
from kombu import Queue

import taskq

from .apps import basic
from .support import ROOT, Broker, WorkerProcess, unique, wait_for

pytestmark = [pytest.mark.timeout(120), pytest.mark.rabbitmq]

ADD = "tests.apps.basic.add"
FAIL = "tests.apps.basic.fail"
RECORD = "tests.apps.basic.record"


# -- a real Celery worker -------------------------------------------------------------------------


class CeleryWorker:
    """``celery -A tests.apps.celery_peer worker`` as a subprocess, its log captured to a file.

    One is shared by the module; each test gives it its own queue with Celery's remote control
    ``add_consumer`` (the same declaration as ``-Q``) and takes it back afterwards.
    """

    def __init__(self, broker: Broker, log_path: Path) -> None:
        self.broker = broker
        self.log_path = log_path
        self.hostname = f"{unique('peer')}@localhost"
        self.first_queue = unique("celery-peer")
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "CELERY_BROKER_URL": broker.url, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.apps.celery_peer", "worker",
             "-Q", self.first_queue, "-n", self.hostname, "-c", "1", "-P", "solo",
             "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "info"],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.control = Celery("taskq-tests-control", broker=broker.url, set_as_current=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _consumers(self, queue: str) -> int:
        if self.proc.poll() is not None:
            raise AssertionError(f"celery worker exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return self.broker.counts(queue)[1]
        except amqp.exceptions.NotFound:
            return 0

    def wait_ready(self, timeout: float = 60) -> CeleryWorker:
        """Ready = consuming its first queue and answering remote control pings.

        A command sent in the instant the worker enters its event loop can sit unread until the
        loop's next ~10s timer; repeated short pings wake it, so later commands go at once.
        """
        wait_for(lambda: self._consumers(self.first_queue) >= 1, timeout,
                 f"the celery worker to consume {self.first_queue}")
        wait_for(self._ping, timeout, "the celery worker to answer a ping", interval=0)
        return self

    def _ping(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"celery worker exited with {self.proc.returncode}:\n{self.log()}")
        return bool(self.control.control.ping(destination=[self.hostname], timeout=0.5))

    def consume(self, queue: str, timeout: float = 20) -> None:
        replies = self.control.control.add_consumer(
            queue, destination=[self.hostname], reply=True, timeout=timeout)
        assert replies and "ok" in replies[0][self.hostname], (replies, self.log())
        wait_for(lambda: self._consumers(queue) >= 1, timeout,
                 f"the celery worker to consume {queue}")

    def _remote_shutdown(self) -> None:
        with contextlib.suppress(Exception):  # the SIGTERM below still comes
            self.control.control.shutdown(destination=[self.hostname])

    def cancel(self, queue: str) -> None:
        self.control.control.cancel_consumer(
            queue, destination=[self.hostname], reply=True, timeout=10)

    def stop(self) -> None:
        """Ask it to shut down by remote control (SIGTERM waits out a ~10s poll in Celery's
        event loop), then make sure the whole process group is gone."""
        try:
            for ask in (self._remote_shutdown, lambda: self.proc.send_signal(signal.SIGTERM)):
                if self.proc.poll() is not None:
                    break
                ask()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(15)
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            self._log.close()
            self.control.close()


@pytest.fixture(scope="module")
def celery_worker(rabbit_session: Broker, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[CeleryWorker]:
    worker = CeleryWorker(rabbit_session, tmp_path_factory.mktemp("celery") / "celery-worker.log")
    try:
        yield worker.wait_ready()
    finally:
        worker.stop()


@pytest.fixture
def celery_queue(celery_worker: CeleryWorker, queue: str) -> Iterator[str]:
    """This test's queue, consumed by the shared Celery worker for the test's duration."""
    celery_worker.consume(queue)
    try:
        yield queue
    finally:
        celery_worker.cancel(queue)


@pytest.fixture
def celery_client(broker: Broker, queue: str) -> Iterator[Celery]:
    """A Celery client app on the test's vhost, sending to the test's queue, rpc:// results."""
    client = Celery("taskq-tests-client", broker=broker.url, backend="rpc://",
                    set_as_current=False)
    # A queue taskq created has a dead-letter route: Celery declares it with the same
    # arguments (the README's migration section says so).
    client.conf.update(
        task_default_queue=queue, broker_connection_retry_on_startup=True,
        task_queues=[Queue(queue, routing_key=queue, queue_arguments={
            "x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{queue}.dlq"})],
    )
    try:
        yield client
    finally:
        consumer = client.backend.result_consumer
        if consumer._consumer is not None:
            consumer.stop()
        client.close()


def assert_log_clean(worker: WorkerProcess) -> None:
    log = worker.log()
    assert "ERROR" not in log and "Traceback" not in log, log


# -- a Celery client, a taskq worker ---------------------------------------------------------------


def test_celery_client_gets_a_taskq_workers_result(
    celery_client: Celery, start_worker: Callable[..., WorkerProcess], queue: str
) -> None:
    """Given a taskq worker, when a Celery client sends add(2, 3), then Celery's get() is 5."""
    worker = start_worker()

    result = celery_client.send_task(ADD, args=(2, 3), queue=queue)

    assert result.get(timeout=10) == 5
    assert result.state == "SUCCESS"
    assert_log_clean(worker)


def test_celery_client_gets_a_builtin_exception_from_a_taskq_worker(
    celery_client: Celery, start_worker: Callable[..., WorkerProcess], queue: str
) -> None:
    """Given a taskq worker, when a task raises ValueError('bad'), then Celery's get() raises
    ValueError('bad') and Celery's result carries the worker's traceback."""
    start_worker()

    result = celery_client.send_task(FAIL, args=("ValueError", "bad"), queue=queue)

    with pytest.raises(ValueError) as excinfo:
        result.get(timeout=10)
    assert excinfo.value.args == ("bad",)
    assert result.state == "FAILURE"
    assert "ValueError: bad" in result.traceback


def test_celery_client_rebuilds_a_custom_exception_it_has_loaded(
    celery_client: Celery, start_worker: Callable[..., WorkerProcess], queue: str
) -> None:
    """Given a taskq task raising basic.CustomError('bad'), when a Celery client gets it,
    then Celery looks the type up in sys.modules (never importing it) and raises CustomError.

    The test process has tests.apps.basic loaded, so Celery finds the very class: taskq's
    exc_type/exc_module are what Celery's own lookup expects.
    """
    start_worker()

    result = celery_client.send_task(FAIL, args=("Custom", "bad"), queue=queue)

    with pytest.raises(basic.CustomError) as excinfo:
        result.get(timeout=10)
    assert excinfo.value.args == ("bad",)
    assert "CustomError: bad" in result.traceback


def test_celery_client_learns_at_once_that_taskq_has_no_such_task(
    celery_client: Celery, start_worker: Callable[..., WorkerProcess], broker: Broker, queue: str
) -> None:
    """Given a taskq worker, when a Celery client sends a task name it lacks, then Celery's get()
    raises NotRegistered naming the task and the message is kept in the dead-letter queue.

    (Celery finds taskq.errors.NotRegistered in sys.modules because this process loaded taskq;
    a Celery-only client gets a class of that name that Celery makes up in celery.exceptions.)"""
    start_worker()

    result = celery_client.send_task("tests.apps.basic.nope", args=(), queue=queue)

    with pytest.raises(taskq.NotRegistered) as excinfo:
        result.get(timeout=10)
    assert "tests.apps.basic.nope" in str(excinfo.value)
    assert result.state == "FAILURE"
    assert broker.counts(f"{queue}.dlq")[0] == 1


def test_celery_fire_and_forget_message_is_run_and_acked(
    celery_client: Celery, start_worker: Callable[..., WorkerProcess], broker: Broker,
    queue: str, tmp_path: Path
) -> None:
    """Given a taskq worker, when a Celery client sends with ignore_result=True, then the task
    runs, its message is acked (the queue drains) and the worker logs no error."""
    worker = start_worker()
    out = tmp_path / "ran.txt"

    celery_client.send_task(RECORD, args=(str(out), "fire"), queue=queue, ignore_result=True)

    wait_for(lambda: out.exists() and out.read_text().split() == ["fire"], 10,
             "the fire-and-forget task to run")
    wait_for(lambda: broker.queue_info(queue)["messages_unacknowledged"] == "0", 10,
             "the task message to be acked")
    assert broker.queue_info(queue)["messages_ready"] == "0"
    assert_log_clean(worker)


def test_celery_fire_and_forget_message_gets_no_reply(
    celery_client: Celery, start_worker: Callable[..., WorkerProcess], broker: Broker,
    queue: str, tmp_path: Path
) -> None:
    """Given a taskq worker, when a Celery client sends with ignore_result=True (its reply_to is
    still set, as Celery always sets it), then no result message is published, as with Celery."""
    start_worker()
    out = tmp_path / "ran.txt"
    reply_queue = unique("celery-reply")
    with broker.channel() as ch:
        ch.queue_declare(reply_queue, durable=False, auto_delete=False)

    celery_client.send_task(RECORD, args=(str(out), "fire"), queue=queue, ignore_result=True,
                            reply_to=reply_queue)

    wait_for(lambda: out.exists(), 10, "the fire-and-forget task to run")
    wait_for(lambda: broker.queue_info(queue)["messages_unacknowledged"] == "0", 10,
             "the task message to be acked")
    try:
        assert broker.counts(reply_queue)[0] == 0
    finally:
        broker.delete_queue(reply_queue)


# -- a taskq client, a Celery worker ---------------------------------------------------------------


def test_taskq_client_gets_a_celery_workers_result(
    tasks: SimpleNamespace, celery_queue: str, celery_worker: CeleryWorker
) -> None:
    """Given a Celery worker on the queue, when taskq sends add(2, 3), then taskq's get() is 5."""
    result = tasks.add.delay(2, 3)

    assert result.get(timeout=10) == 5
    assert result.state == "SUCCESS"
    wait_for(lambda: f"{ADD}[{result.id}] succeeded" in celery_worker.log(), 10,
             "the celery worker to log the task it ran")


def test_taskq_client_gets_a_builtin_exception_from_a_celery_worker(
    tasks: SimpleNamespace, celery_queue: str
) -> None:
    """Given a Celery worker, when its task raises ValueError('bad'), then taskq's get() raises
    ValueError('bad') and the worker's traceback is kept on the result."""
    result = tasks.fail.delay("ValueError", "bad")

    with pytest.raises(ValueError) as excinfo:
        result.get(timeout=10)
    assert excinfo.value.args == ("bad",)
    assert result.state == "FAILURE"
    assert "ValueError: bad" in (result.traceback or "")


def test_taskq_client_gets_remote_error_for_a_celery_workers_custom_exception(
    tasks: SimpleNamespace, celery_queue: str
) -> None:
    """Given a Celery worker, when its task raises celery_peer.PeerError('bad'), then taskq's
    get() raises RemoteError naming the type and module, with the remote traceback."""
    result = tasks.fail.delay("Custom", "bad")

    with pytest.raises(taskq.RemoteError) as excinfo:
        result.get(timeout=10)
    error = excinfo.value
    assert error.exc_type == "PeerError"
    assert error.exc_module == "tests.apps.celery_peer"
    assert error.exc_message == "bad"
    assert error.remote_traceback is not None
    assert "PeerError: bad" in error.remote_traceback
    assert "celery_peer.py" in error.remote_traceback


# -- chains, both ways -----------------------------------------------------------------------------
#
# A chain's first message carries the later steps in protocol v2's ``chain`` field (last step
# first); the worker that finished a step sends the next one, with the previous result
# prepended, and each step's result goes to the caller's ``reply_to``.  Neither side knows
# the other's code: Celery's chain is built from task names, taskq's from its signatures.

INTEROP = "tests.apps.interop:app"
MUL = "tests.apps.interop.mul"
BOOM = "tests.apps.flows.boom"
STEP = "tests.apps.flows.step"


def _notes(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []


def _quiet(broker: Broker, queue: str) -> None:
    """Until ``queue`` has nothing ready and nothing held: every step sent to it has run."""
    def quiet() -> bool:
        info = broker.queue_info(queue)
        return info["messages_ready"] == "0" and info["messages_unacknowledged"] == "0"
    wait_for(quiet, 20, f"{queue} to have nothing ready or held")


def test_celery_clients_chain_runs_on_taskq_workers_and_celery_gets_the_last_value(
    celery_client: Celery, start_worker: Callable[..., WorkerProcess], broker: Broker, queue: str
) -> None:
    """Given a taskq worker whose default queue is the Celery client's, when Celery sends
    chain(add.s(1, 2), add.s(3), mul.s(10)), then Celery's own AsyncResult gets 60, and each
    step's result (rpc://) is the one before it, in order."""
    worker = start_worker(app=INTEROP, env={"TASKQ_TEST_DEFAULT_QUEUE": queue})
    sig = celery_client.signature

    result = celery_chain(sig(ADD, (1, 2)), sig(ADD, (3,)), sig(MUL, (10,))).apply_async()

    assert result.get(timeout=20) == 60
    assert result.state == "SUCCESS"
    assert (result.parent.get(timeout=10), result.parent.parent.get(timeout=10)) == (6, 3)
    _quiet(broker, queue)
    assert broker.dead_letter_count(queue) == 0
    assert_log_clean(worker)


def test_celery_chain_steps_keep_their_own_queues_and_immutability_on_taskq_workers(
    celery_client: Celery, start_worker: Callable[..., WorkerProcess], broker: Broker, queue: str
) -> None:
    """Given a taskq worker with another default queue, when Celery sends a chain whose steps
    name their queue (``.set(queue=...)``) and one of them is immutable (``.si``), then the
    steps go to that queue and the immutable one ignores the result before it."""
    worker = start_worker(app=INTEROP)  # default queue "taskq": the steps say where they go
    sig = celery_client.signature

    workflow = celery_chain(sig(ADD, (1, 2)).set(queue=queue),
                            sig(ADD, (5, 5), immutable=True).set(queue=queue),  # Celery's .si
                            sig(MUL, (10,)).set(queue=queue))
    result = workflow.apply_async()

    assert result.get(timeout=20) == 100  # (a step sent to "taskq" would never have run)
    _quiet(broker, queue)
    assert_log_clean(worker)


def test_celery_client_gets_a_taskq_chains_failure_and_later_steps_do_not_run(
    celery_client: Celery, start_worker: Callable[..., WorkerProcess], broker: Broker,
    queue: str, tmp_path: Path
) -> None:
    """Given a taskq worker, when a Celery chain's middle step raises ValueError('no good'),
    then Celery's get() on the chain raises that ValueError at once, the failed step's own
    result is that FAILURE, and the step after it never runs."""
    start_worker(app=INTEROP, env={"TASKQ_TEST_DEFAULT_QUEUE": queue})
    log = tmp_path / "steps"
    sig = celery_client.signature

    result = celery_chain(sig(STEP, (0, str(log), "a")), sig(BOOM, ("no good",)),
                          sig(STEP, (str(log), "c"))).apply_async()

    with pytest.raises(ValueError) as excinfo:
        result.get(timeout=20)  # raised as soon as the failed step's result is in
    assert excinfo.value.args == ("no good",)
    failed = result.parent
    assert failed.state == "FAILURE" and "ValueError: no good" in failed.traceback
    # The last step's own result is that failure too (Celery's worker sends it as well).
    with pytest.raises(ValueError, match="no good"):
        result.get(timeout=10, follow_parents=False)
    assert result.state == "FAILURE"
    _quiet(broker, queue)
    assert _notes(log) == ["a"]
    assert broker.dead_letter_count(queue) == 0


def test_taskq_clients_chain_runs_on_a_celery_worker_and_taskq_gets_the_last_value(
    tasks: SimpleNamespace, celery_queue: str, celery_worker: CeleryWorker, broker: Broker
) -> None:
    """Given a Celery worker on the queue, when taskq sends add.s(1, 2) | add.s(3) | mul.s(10),
    then taskq's one AsyncResult gets 60: Celery's worker sent each next step itself."""
    mul = taskq.signature(MUL, (10,), app=tasks.app)

    result = (tasks.add.s(1, 2) | tasks.add.s(3) | mul).delay()

    assert result.get(timeout=20) == 60
    assert result.state == "SUCCESS"
    wait_for(lambda: f"{MUL}[{result.id}] succeeded" in celery_worker.log(), 10,
             "the celery worker to log the last step it ran")
    _quiet(broker, celery_queue)


def test_taskq_client_gets_a_celery_chains_failure_and_later_steps_do_not_run(
    tasks: SimpleNamespace, celery_queue: str, celery_worker: CeleryWorker, broker: Broker,
    tmp_path: Path
) -> None:
    """Given a Celery worker, when a taskq chain's middle step raises ValueError('no good'),
    then taskq's get() raises that ValueError with Celery's traceback, and the step after it
    never runs."""
    log = tmp_path / "steps"
    app = tasks.app
    first = taskq.signature(STEP, (0, str(log), "a"), app=app)
    bad = taskq.signature(BOOM, ("no good",), app=app)
    last = taskq.signature(STEP, (str(log), "c"), app=app)

    result = (first | bad | last).delay()

    with pytest.raises(ValueError) as excinfo:
        result.get(timeout=20)
    assert excinfo.value.args == ("no good",)
    assert result.state == "FAILURE"
    assert "ValueError: no good" in (result.traceback or "")
    wait_for(lambda: f"{BOOM}[" in celery_worker.log(), 10,
             "the celery worker to log the step that failed")
    _quiet(broker, celery_queue)
    assert _notes(log) == ["a"]


def _hopping_chain_ran_on_both(log: Path, celery_worker: CeleryWorker) -> None:
    """Steps 1 and 3 ran on the taskq worker, 2 and 4 on the Celery worker, once each."""
    notes = [line.split() for line in log.read_text().splitlines()]
    assert [token for token, _ in notes] == ["1", "2", "3", "4"], notes
    celery_pid = str(celery_worker.proc.pid)  # solo pool: tasks run in the worker process
    assert [pid == celery_pid for _, pid in notes] == [False, True, False, True], notes


@pytest.fixture
def taskq_hop_queue(celery_queue: str, broker: Broker,
                    start_worker: Callable[..., WorkerProcess]) -> Iterator[str]:
    """A second queue, served by a taskq worker, next to the Celery worker's.

    Declared first as a Celery app declares a queue it publishes to (no arguments), so the
    Celery worker may send steps to it; taskq uses such a queue as it is."""
    hop = f"{celery_queue}-taskq"
    with broker.channel() as ch:
        ch.queue_declare(hop, durable=True, auto_delete=False)
    start_worker(app=INTEROP, queues=[hop], env={"TASKQ_TEST_DEFAULT_QUEUE": hop})
    try:
        yield hop
    finally:
        broker.delete_queue(hop)


def test_a_celery_chain_hops_between_taskq_and_celery_workers(
    celery_client: Celery, celery_worker: CeleryWorker, celery_queue: str, taskq_hop_queue: str,
    tmp_path: Path
) -> None:
    """Given a taskq worker and a Celery worker on two queues, when a Celery client sends a
    chain whose steps alternate between them, then each worker sends the next step to the
    other (each reads the other's ``chain`` field) and Celery gets the last value."""
    log = tmp_path / "steps"
    sig = celery_client.signature
    on = [taskq_hop_queue, celery_queue, taskq_hop_queue, celery_queue]
    first = sig(STEP, (0, str(log), "1")).set(queue=on[0])
    later = [sig(STEP, (str(log), str(n))).set(queue=on[n - 1]) for n in (2, 3, 4)]

    result = celery_chain(first, *later).apply_async()

    assert result.get(timeout=30) == 4
    _hopping_chain_ran_on_both(log, celery_worker)


def test_a_taskq_chain_hops_between_taskq_and_celery_workers(
    tasks: SimpleNamespace, celery_worker: CeleryWorker, celery_queue: str,
    taskq_hop_queue: str, tmp_path: Path
) -> None:
    """Given a taskq worker and a Celery worker on two queues, when a taskq client sends a
    chain whose steps alternate between them, then taskq's one AsyncResult gets the last."""
    log = tmp_path / "steps"
    on = [taskq_hop_queue, celery_queue, taskq_hop_queue, celery_queue]
    steps = [taskq.signature(STEP, (0, str(log), "1"), app=tasks.app).set(queue=on[0])]
    steps += [taskq.signature(STEP, (str(log), str(n)), app=tasks.app).set(queue=on[n - 1])
              for n in (2, 3, 4)]

    result = taskq.chain(*steps).delay()

    assert result.get(timeout=30) == 4
    _hopping_chain_ran_on_both(log, celery_worker)


# -- Celery's routing options and link_error on taskq workers --------------------------------


def test_celery_chain_step_routed_by_the_default_exchange_runs_on_taskq_workers(
    celery_client: Celery, start_worker: Callable[..., WorkerProcess], queue: str
) -> None:
    start_worker(app=INTEROP, env={"TASKQ_TEST_DEFAULT_QUEUE": queue})
    sig = celery_client.signature
    routed = sig(ADD, (3,)).set(exchange="", routing_key=queue)  # Celery: straight to `queue`

    result = celery_chain(sig(ADD, (1, 2)), routed, sig(MUL, (10,))).apply_async()

    assert result.get(timeout=10) == 60


def test_celery_chains_errback_runs_when_a_step_fails_on_a_taskq_worker(
    celery_client: Celery, start_worker: Callable[..., WorkerProcess], queue: str,
    tmp_path: Path
) -> None:
    start_worker(app=INTEROP, env={"TASKQ_TEST_DEFAULT_QUEUE": queue})
    notes = tmp_path / "notes"
    sig = celery_client.signature
    errback = sig(RECORD, (str(notes), "errback"), immutable=True)

    result = celery_chain(sig(ADD, (1, 2)), sig(BOOM, ("no good",))).on_error(errback)\
        .apply_async()

    with pytest.raises(ValueError):
        result.get(timeout=10)
    wait_for(lambda: _notes(notes) == ["errback"], 10, "the chain's errback to run")
