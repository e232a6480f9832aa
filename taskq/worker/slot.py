"""One execution slot: one broker connection, and the tasks it receives run right here.

The slot's thread waits (``poll``) on its broker socket and a wake-up pipe, takes one message
at a time (prefetch 1), runs the task in this same thread, publishes the result and acks. No
hand-off to another thread or process: on a busy machine every extra wake-up costs more than
the task itself, and this is what keeps a round trip close to a bare AMQP echo.

* While a task runs, :mod:`taskq.worker.heartbeat` keeps the connection's heartbeats going.
* A task with a hard ``time_limit`` runs in an executor child process instead
  (:mod:`taskq.worker.executor`), which the slot kills and replaces if the limit passes; the
  slot waits on it together with its socket, so heartbeats and acks flow meanwhile.
* A message is acked only after its result is published on the same channel; one that can't
  run is dead-lettered (confirmed) and then acked. Prefetch 1 means the broker sends the next
  message only after the ack, so a slot never holds a message it is not running.
* If the process dies mid-task the broker redelivers the message; the slot that gets it counts
  the loss in the message (classic queues keep no delivery count) and buries it after
  ``delivery_limit`` losses.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import select
import time
from collections import deque
from typing import Any, Protocol

from ..app import App
from ..broker.amqp.consumer import SlotConnection
from ..errors import DeclarationConflict, TimeLimitExceeded, WorkerLostError
from ..message import Delivery
from . import letters
from .execute import Job, Outcome, execute, failure_outcome
from .executor import ProcessExecutor
from .triage import Later, Recount, Refuse, SlotOptions, reply_to, triage

log = logging.getLogger("taskq.worker")

_POLLIN = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR


class Reporter(Protocol):
    """Where a slot reports what its supervisor should know (and log once, not per slot)."""

    def connection_lost(self, slot: str, reason: str, opened_at: float | None = None) -> None: ...
    def connection_restored(self, slot: str) -> None: ...
    def running(self, slot: str, label: str | None) -> None: ...


class Slot:
    def __init__(
        self, app: App, options: SlotOptions, index: int, reporter: Reporter, *, main_thread: bool
    ) -> None:
        self.name = f"slot-{index}"
        self.app = app
        self.options = options
        self.reporter = reporter
        self.config = app.config
        self.broker = app.broker
        #: Soft time limits use SIGALRM, which only the main thread receives.
        self.main_thread = main_thread
        self.conn: SlotConnection | None = None
        self.consuming = False
        self.inbox: deque[Delivery] = deque()
        self.executor: ProcessExecutor | None = None
        self.current: Delivery | None = None
        self.current_conn: SlotConnection | None = None
        self.started_at = 0.0
        self.hard_limit: float | None = None
        #: When the task running in this thread started (None: none is), for heartbeats.
        self.running_since: float | None = None
        self.stashed: list[tuple[Delivery, Outcome]] = []
        self.stopping = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._executor_changed = False

    # -- control -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Warm stop: take no more messages, finish the current one, then return."""
        self.stopping = True
        self.wake()

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def kill_current(self) -> None:
        """Cold stop of a task running in the executor (an inline one dies with the process)."""
        if self.executor is not None:
            self.executor.kill()

    @property
    def heartbeat_interval(self) -> float:
        conn = self.conn
        return conn.heartbeat_interval if conn is not None else 0.0

    def beat_if_busy(self, quiet_for: float) -> None:
        """Called by the heartbeat thread: send one if a task has kept this thread busy."""
        since, conn = self.running_since, self.current_conn
        if (
            since is not None
            and conn is not None
            and conn is self.conn
            and (time.monotonic() - since >= quiet_for)
        ):
            conn.send_heartbeat()

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until stopped. Raises what can't be recovered from (e.g. a queue conflict)."""
        try:
            while not (self.stopping and self.current is None):
                if self.conn is None:
                    self._connect()
                    continue
                try:
                    self._serve(self.conn)
                except DeclarationConflict:
                    raise
                except Exception as exc:
                    self._connection_lost(exc)
        finally:
            self._close()

    def _close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.executor is not None:
            self.executor.close()
            self.executor = None
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _connect(self) -> None:
        delay = 0.1
        while self.conn is None and not (self.stopping and self.current is None):
            try:
                self.conn = self.broker.slot_connection(
                    list(self.options.queues),
                    self.inbox.append,
                    timeout=self.config.connect_timeout,
                    name=f"taskq worker {self.name}",
                )
            except DeclarationConflict:
                raise
            except Exception as exc:
                if not self.broker.is_recoverable(exc):
                    raise
                self.reporter.connection_lost(self.name, self.broker.describe(exc))
                self._wait_without_broker(delay)
                delay = min(delay * 2, 5.0)
        if self.conn is not None:
            self.reporter.connection_restored(self.name)

    def _connection_lost(self, exc: BaseException) -> None:
        opened_at = None
        if self.conn is not None:
            opened_at = self.conn.opened_at
            self.conn.drop()
            self.conn = None
        self.consuming = False
        self.inbox.clear()  # unacked deliveries of a dead connection return to the queue
        if letters.is_consumer_timeout(exc):
            log.error(
                "%s: the broker closed the channel because a task held its message longer than "
                "RabbitMQ's consumer_timeout; the message goes back to the queue and will run "
                "again. Raise consumer_timeout on the broker (rabbitmq.conf) above the longest "
                "task, or split the task.",
                self.name,
            )
        elif not self.broker.is_recoverable(exc):
            log.error("%s: unexpected error, reconnecting: %r", self.name, exc, exc_info=exc)
        self.reporter.connection_lost(self.name, self.broker.describe(exc), opened_at)

    def _wait_without_broker(self, timeout: float) -> None:
        """While reconnecting, keep watching the executor (its results are stashed)."""
        poller = select.poll()
        poller.register(self._wake_r, _POLLIN)
        if self.executor is not None:
            poller.register(self.executor.fileno(), _POLLIN)
        for fd, _ in poller.poll(self._timeout_ms(timeout)):
            if fd == self._wake_r:
                self._drain_wake()
            elif self.executor is not None:
                self._finish(self.executor.collect())
        self._check_time_limit()

    def _serve(self, conn: SlotConnection) -> None:
        self._flush_stash(conn)
        poller = select.poll()
        conn_fd = conn.input.fileno()
        poller.register(conn_fd, _POLLIN)
        poller.register(self._wake_r, _POLLIN)
        exec_fd = -1
        self._executor_changed = self.executor is not None
        tick = min(1.0, conn.heartbeat_interval / 4) if conn.heartbeat_interval else 1.0
        next_tick = time.monotonic() + tick
        while self._keep_serving(conn):
            if self._executor_changed:
                self._executor_changed = False
                if exec_fd >= 0:
                    poller.unregister(exec_fd)
                exec_fd = self.executor.fileno() if self.executor is not None else -1
                if exec_fd >= 0:
                    poller.register(exec_fd, _POLLIN)
            if conn.input.buffered():
                events = [(conn_fd, select.POLLIN)]
            else:
                events = poller.poll(self._timeout_ms(next_tick - time.monotonic()))
            for fd, _ in events:
                if fd == conn_fd:
                    conn.drain()
                elif fd == exec_fd and self.executor is not None:
                    if not self._executor_changed:
                        self._finish(self.executor.collect())
                else:
                    self._drain_wake()
            if self.current is None and self.inbox:
                self._start(self.inbox.popleft())
            self._check_time_limit()
            now = time.monotonic()
            if now >= next_tick:
                conn.heartbeat_tick()
                next_tick = now + tick

    def _keep_serving(self, conn: SlotConnection) -> bool:
        """Start consuming (once, when idle); cancel when stopping. False once stopped with
        nothing in hand."""
        if self.stopping:
            if self.consuming:
                conn.cancel_all()
                self.consuming = False
            return self.current is not None or bool(self.inbox)
        if not self.consuming and self.current is None:
            conn.start()
            self.consuming = True
        return True

    def _timeout_ms(self, seconds: float) -> int:
        if self.hard_limit is not None:
            seconds = min(seconds, self.started_at + self.hard_limit - time.monotonic())
        return max(0, int(seconds * 1000) + 1)

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._wake_r, 64):
                pass

    # -- a message arrives --------------------------------------------------------------------

    def _start(self, delivery: Delivery) -> None:
        decision = triage(delivery, self.app, self.options, self.name)
        if isinstance(decision, Refuse):
            self._reject(delivery, decision.error)
        elif isinstance(decision, Recount):
            self._requeue_or_bury(
                delivery,
                letters.delivery_count(delivery) + 1,
                "its worker was lost before it finished",
            )
        elif isinstance(decision, Later):
            self._later(delivery, decision.seconds)
        elif decision.hard_limit:
            self._submit(delivery, decision.job, decision.hard_limit)
        else:
            self._run_here(delivery, decision.job)

    def _run_here(self, delivery: Delivery, job: Job) -> None:
        self.current, self.current_conn = delivery, self.conn
        self.reporter.running(self.name, f"{job.task}[{job.task_id}]")
        self.running_since = time.monotonic()
        try:
            outcome = execute(self.app, job, use_signals=self.main_thread)
        finally:
            self.running_since = None
            self.reporter.running(self.name, None)
        self._finish(outcome)

    def _submit(self, delivery: Delivery, job: Job, hard_limit: float) -> None:
        if self.executor is not None and not self.executor.process.is_alive():
            self._replace_executor()  # it died while idle, and the slot had not heard yet
        if self.executor is None:
            self.executor = self._new_executor()
        self.current, self.current_conn = delivery, self.conn
        self.reporter.running(self.name, f"{job.task}[{job.task_id}]")
        self.started_at = time.monotonic()
        self.hard_limit = hard_limit
        self.executor.submit(job)

    def _new_executor(self) -> ProcessExecutor:
        context: Any = multiprocessing.get_context("forkserver")
        with contextlib.suppress(ValueError):  # set before the context's first start only
            context.set_forkserver_preload([self.options.app_spec.partition(":")[0]])
        executor = ProcessExecutor(
            context, self.options.app_spec, self.options.loglevel, f"{self.name}-limited"
        )
        executor.wait_ready(timeout=60.0)
        self._executor_changed = True
        return executor

    def _later(self, delivery: Delivery, seconds: float) -> None:
        assert self.conn is not None
        self.conn.publish_confirmed(
            letters.delayed(delivery, seconds), timeout=self.config.publish_timeout
        )
        self.conn.ack(delivery.tag)
        log.debug(
            "task %s[%s] is due in %.3fs: back to the broker's delay queues",
            delivery.task_name,
            delivery.task_id,
            seconds,
        )

    # -- the outcome -----------------------------------------------------------------------

    def _finish(self, outcome: Outcome | None) -> None:
        delivery, conn = self.current, self.current_conn
        self.current = self.current_conn = None
        self.hard_limit = None
        self.reporter.running(self.name, None)
        if delivery is None:
            if outcome is None and self.executor is not None:
                log.warning(
                    "%s: idle executor process died (%s); a new one starts when needed",
                    self.name,
                    self.executor.describe_death(),
                )
                self._replace_executor()
            return
        if outcome is None:
            self._worker_lost(delivery, conn)
            return
        try:
            if conn is self.conn and conn is not None:
                if conn.input.waiting():
                    conn.drain()  # raises if the broker closed the channel meanwhile
                if self.stopping and self.consuming:
                    # Stop consuming before the ack frees the prefetch slot, or the broker
                    # hands this stopping slot one more message.
                    conn.cancel_all()
                    self.consuming = False
            if self.conn is None or conn is not self.conn:
                self._stale(delivery, outcome)
            elif outcome.kind == "done":
                self._settle(delivery, outcome)
            elif outcome.kind == "reject":
                self._dead_letter(delivery, outcome.exc_type, outcome.detail, outcome)
            else:
                self._retry(delivery, outcome)
        except Exception:
            # The connection failed under us: the broker will redeliver the message; keep the
            # result to send once reconnected, so the caller need not wait for the rerun.
            self._stale(delivery, outcome, stash=True)
            raise

    def _settle(self, delivery: Delivery, outcome: Outcome) -> None:
        conn = self.conn
        assert conn is not None
        conn.reply_and_ack(
            reply_to(delivery),
            delivery.correlation_id or delivery.task_id or "",
            outcome.body,
            outcome.content_type,
            delivery.tag,
        )

    def _stale(self, delivery: Delivery, outcome: Outcome, *, stash: bool = False) -> None:
        """The task finished, but its message belonged to a connection that has died: send
        the result on the current connection, or keep it (``stash``) until there is one."""
        log.warning(
            "task %s[%s] finished after the broker connection it came on was lost: the broker "
            "will deliver it again (at-least-once); its caller gets the first result only",
            delivery.task_name,
            delivery.task_id,
        )
        if outcome.kind != "done" or not reply_to(delivery) or outcome.body is None:
            return
        if stash or self.conn is None:
            self.stashed.append((delivery, outcome))
            return
        self._reply(self.conn, delivery, outcome)

    def _flush_stash(self, conn: SlotConnection) -> None:
        """Send the results stashed while the broker was away (one at a time: if this
        connection fails too, the rest stay stashed)."""
        while self.stashed:
            delivery, outcome = self.stashed[0]
            self._reply(conn, delivery, outcome)
            del self.stashed[0]

    def _reject(self, delivery: Delivery, exc: BaseException) -> None:
        outcome = failure_outcome(delivery.task_id or "", exc, kind="reject")
        self._dead_letter(delivery, type(exc).__name__, str(exc), outcome)

    def _dead_letter(
        self, delivery: Delivery, exc_type: str, reason: str, outcome: Outcome
    ) -> None:
        conn = self.conn
        assert conn is not None
        envelope = letters.dead_letter(delivery, exc_type, reason, self.options.hostname)
        conn.publish_confirmed(envelope, timeout=self.config.publish_timeout)
        self._reply(conn, delivery, outcome)
        conn.ack(delivery.tag)
        log.error(
            "task %s[%s] moved to dead-letter queue %s: %s: %s",
            delivery.task_name,
            delivery.task_id,
            envelope.queue,
            exc_type,
            reason,
        )

    def _retry(self, delivery: Delivery, outcome: Outcome) -> None:
        conn = self.conn
        assert conn is not None
        conn.publish_confirmed(
            letters.retry(delivery, outcome.countdown), timeout=self.config.publish_timeout
        )
        self._reply(conn, delivery, outcome)
        conn.ack(delivery.tag)

    @staticmethod
    def _reply(conn: SlotConnection, delivery: Delivery, outcome: Outcome) -> None:
        """Send the caller its result, if it wants one (the ack follows on the same channel)."""
        destination = reply_to(delivery)
        if destination and outcome.body is not None:
            conn.publish_result(
                destination,
                delivery.correlation_id or delivery.task_id or "",
                outcome.body,
                outcome.content_type,
            )

    # -- deaths and time limits -------------------------------------------------------------

    def _worker_lost(self, delivery: Delivery, conn: SlotConnection | None) -> None:
        assert self.executor is not None
        death = self.executor.describe_death()
        log.error(
            "%s: the process running task %s[%s] died (%s)",
            self.name,
            delivery.task_name,
            delivery.task_id,
            death,
        )
        self._replace_executor()
        if self.conn is None or conn is not self.conn:
            return  # the broker requeues it with the dead connection
        count = letters.delivery_count(delivery) + 1
        self._requeue_or_bury(delivery, count, f"the process running it died ({death})")

    def _requeue_or_bury(self, delivery: Delivery, count: int, why: str) -> None:
        conn = self.conn
        assert conn is not None
        limit = self.config.delivery_limit
        if count >= limit:
            self._reject(
                delivery,
                WorkerLostError(
                    f"task {delivery.task_name}[{delivery.task_id}] was attempted {count} times "
                    f"and {why} every time; dead-lettered as a poison message "
                    f"(delivery_limit={limit})"
                ),
            )
            return
        conn.publish_confirmed(
            letters.counted_copy(delivery, count), timeout=self.config.publish_timeout
        )
        conn.ack(delivery.tag)
        log.warning(
            "task %s[%s]: %s; requeued (attempt %d of at most %d)",
            delivery.task_name,
            delivery.task_id,
            why,
            count + 1,
            limit,
        )

    def _check_time_limit(self) -> None:
        if self.hard_limit is None or self.current is None or self.executor is None:
            return
        if time.monotonic() < self.started_at + self.hard_limit:
            return
        delivery, limit = self.current, self.hard_limit
        log.error(
            "task %s[%s] exceeded its time limit of %gs; stopping it",
            delivery.task_name,
            delivery.task_id,
            limit,
        )
        self.executor.kill()
        self._replace_executor()
        exc = TimeLimitExceeded(
            f"task {delivery.task_name}[{delivery.task_id}] ran past time_limit={limit:g}s "
            "and was stopped"
        )
        self._finish(failure_outcome(delivery.task_id or "", exc, kind="done"))

    def _replace_executor(self) -> None:
        """Close the executor; a new one starts when a time-limited task next needs it."""
        if self.executor is not None:
            self.executor.close()
            self.executor = None
            self._executor_changed = True
