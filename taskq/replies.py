"""Results coming back: one reply queue per client process, read on the connection that sends.

Every ``.delay()`` that wants a result registers a :class:`Pending` under its task id *before*
the message is published, so a result never arrives unexpected: it is filed in its Pending at
once ("early arrivals") and whoever waits on it, in any thread, in any order, finds it there.
A final result is filed once: duplicates (a task that ran twice under at-least-once delivery)
find no entry and are dropped.

The *primary* connection both publishes and consumes the reply queue, and whichever thread is
using it reads whatever arrives: a sender waiting for its confirm files results as they come,
a caller in ``get()`` reads its own result off the socket. Only one thread reads at a time (it
holds "the lead"); other waiters sleep until a result for them is filed. So a single-threaded
client never hands a result from one thread to another. A keeper thread files results when
nobody else reads, sends heartbeats, and reconnects after an outage.

The reply queue is durable with ``x-expires``: results (published persistent) survive a
broker restart, and the broker deletes the queue once its client has been gone for
``reply_queue_expires``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
import uuid
import weakref
from typing import Any, Protocol, TypeVar

from . import serialization, states
from .broker import Broker
from .broker.base import ClientLink
from .config import Config
from .errors import BrokerUnavailable, DecodeError, ResultUnavailable
from .message import Delivery, exception_to_wire

P = TypeVar("P", bound="Pending")

log = logging.getLogger("taskq.results")

#: How often the keeper looks at the primary connection when nobody else does (seconds).
KEEPER_TICK = 0.25


class Waker:
    """A pipe a thread polls beside the socket while it waits for a result without reading.

    If another thread reads that result (a sender on the same connection, the keeper), it
    writes a byte here; without it the waiter would sleep on a socket that has nothing more
    for it. One per waiting thread (see :func:`thread_waker`).
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.thread = threading.get_ident()
        self.fd, self._write_fd = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._write_fd, False)

    def wake(self) -> None:
        """From the thread that filed the result (nothing to do if that is the waiter)."""
        if threading.get_ident() != self.thread:
            with contextlib.suppress(OSError):  # full: it is awake already
                os.write(self._write_fd, b"\0")

    def clear(self) -> None:
        with contextlib.suppress(OSError):
            os.read(self.fd, 4096)

    def __del__(self) -> None:
        for fd in (self.fd, self._write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


_wakers = threading.local()


def thread_waker() -> Waker:
    """This thread's Waker (a new one in a child process after fork())."""
    waker: Waker | None = getattr(_wakers, "waker", None)
    if waker is None or waker.pid != os.getpid():
        waker = _wakers.waker = Waker()
    return waker


class Wakeable(Protocol):
    """What a :class:`Pending` wakes once its result is filed: a waiting thread's
    :class:`Waker`, or a watcher of many results (``taskq.gather``, ``taskq.as_completed``).
    Called by whichever thread files the result, so it must be quick and never block."""

    def wake(self) -> None: ...


class Pending:
    """The slot a result lands in; shared by the reading thread and any waiting threads."""

    __slots__ = ("__weakref__", "done", "meta", "pid", "state", "task_id", "wakers")
    #: Whether more than one result is filed here (a broadcast's).
    gathers = False

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        #: Set once the final result is filed; then the ``wakers`` of waiting threads are woken.
        self.done = False
        self.meta: dict[str, Any] | None = None
        self.state: str = states.PENDING
        self.pid = os.getpid()
        self.wakers: list[Wakeable] = []

    def resolve(self, meta: dict[str, Any]) -> None:
        self.meta = meta
        self.state = str(meta.get("status"))
        self.done = True
        for waker in tuple(self.wakers):
            waker.wake()


class Gathering(Pending):
    """The results of a broadcast: one per worker (``meta["worker"]``), for as long as the
    caller keeps the handle. Done once ``expected`` workers answered (None: never)."""

    __slots__ = ("by_worker", "expected")
    gathers = True

    def __init__(self, task_id: str, expected: int | None = None) -> None:
        super().__init__(task_id)
        self.by_worker: dict[str, dict[str, Any]] = {}
        self.expected = expected

    def resolve(self, meta: dict[str, Any]) -> None:
        worker = str(meta.get("worker") or f"worker-{len(self.by_worker) + 1}")
        self.by_worker.setdefault(worker, meta)  # the first result of each: at-least-once
        self.meta = meta
        if self.expected is not None and len(self.by_worker) >= self.expected:
            self.done = True
        for waker in tuple(self.wakers):
            waker.wake()


def _failure_meta(task_id: str, exc: BaseException) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "status": states.FAILURE,
        "result": exception_to_wire(exc),
        "traceback": None,
    }


class ReplyConsumer:
    """Owns this process's reply queue, its primary connection and the keeper thread."""

    def __init__(self, broker: Broker, config: Config) -> None:
        self.broker = broker
        self.config = config
        # Results are always readable as JSON (it executes nothing); pickle only if accepted.
        self._accept = tuple(dict.fromkeys(("json", *config.accept)))
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self.queue = f"taskq.reply.{uuid.uuid4().hex}"
        self._registry = threading.Lock()
        self._pending: weakref.WeakValueDictionary[str, Pending] = weakref.WeakValueDictionary()
        self._cond = threading.Condition()
        self._leading = False
        self._primary: ClientLink | None = None
        self._started = False
        self._keeper: threading.Thread | None = None
        self._stopping = threading.Event()
        #: monotonic time the primary connection was lost, or None while connected.
        self.down_since: float | None = None
        self._down_reason = ""

    # -- registering ---------------------------------------------------------------------------

    def expect(self, task_id: str) -> Pending:
        """Register interest in ``task_id`` (before sending it); set up the queue if needed."""
        return self._register(Pending(task_id))

    def gather(self, task_id: str) -> Gathering:
        """Register interest in every result of broadcast ``task_id`` (before sending it)."""
        return self._register(Gathering(task_id))

    def _register(self, pending: P) -> P:
        if self._pid != os.getpid():
            self._after_fork()
        if not self._started:
            self._start()
        with self._registry:
            self._pending[pending.task_id] = pending
        return pending

    def forget(self, task_id: str) -> None:
        with self._registry:
            self._pending.pop(task_id, None)

    def _start(self) -> None:
        with self._cond:
            if self._started:
                return
            self._primary = self._connect(
                must_exist=False, deadline=(time.monotonic() + self.config.publish_timeout)
            )
            self._started = True
            self._keeper = threading.Thread(
                target=self._keep, args=(self._stopping,), name="taskq-results", daemon=True
            )
            self._keeper.start()

    def _connect(self, *, must_exist: bool, deadline: float) -> ClientLink:
        delay = 0.05
        while True:
            try:
                conn = self.broker.client_link(
                    timeout=max(0.05, deadline - time.monotonic()), name="taskq client"
                )
                try:
                    intact = conn.consume_replies(
                        self.queue,
                        self.config.reply_queue_expires,
                        self._file,
                        must_exist=must_exist,
                    )
                except BaseException:
                    conn.drop()
                    raise
            except Exception as exc:
                if not self.broker.is_recoverable(exc) or time.monotonic() >= deadline:
                    if isinstance(exc, BrokerUnavailable):
                        raise
                    raise BrokerUnavailable(
                        f"could not open a reply queue within {self.config.publish_timeout:g}s:"
                        f" the broker at {self.broker.display_url} did not answer "
                        f"({self.broker.describe(exc)}). {self.broker.unreachable_hint}"
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if not intact:
                self._fail_all_pending()
            return conn

    # -- the lead: one thread at a time uses the primary connection -----------------------------

    def _take_lead(self, wait: float = 0.0) -> bool:
        with self._cond:
            if self._leading and wait > 0:
                end = time.monotonic() + wait
                while self._leading and (left := end - time.monotonic()) > 0:
                    self._cond.wait(left)
            if self._leading:
                return False
            self._leading = True
            return True

    def _release_lead(self) -> None:
        with self._cond:
            self._leading = False
            self._cond.notify_all()

    def lend(self) -> ClientLink | None:
        """The primary connection, for publishing, if it is up and no other thread uses it.

        Waits a moment if another thread reads right now (the lead is held for microseconds)
        rather than have the caller open a second connection. Give it back with
        :meth:`give_back`.
        """
        if self._pid != os.getpid() or not self._take_lead(wait=0.002):
            return None
        if self._primary is None:
            self._release_lead()
        return self._primary

    def give_back(self, conn: ClientLink, error: BaseException | None = None) -> None:
        """Return a lent connection; after a connection error the keeper reconnects."""
        try:
            if error is not None and conn is self._primary and self.broker.is_recoverable(error):
                error.blocked = conn.blocked  # type: ignore[attr-defined]
                self._lost(error)
        finally:
            self._release_lead()

    def _lost(self, exc: BaseException) -> None:
        """The primary connection failed (while we hold the lead): the keeper reconnects."""
        if self._primary is not None:
            self._primary.drop()
            self._primary = None
        self.down_since = self.down_since or time.monotonic()
        self._down_reason = self.broker.describe(exc)
        log.warning(
            "lost the connection to %s (%s); reconnecting",
            self.broker.display_url,
            self._down_reason,
        )

    # -- waiting ---------------------------------------------------------------------------------

    def wait(self, pending: Pending, deadline: float | None) -> None:
        """Return when ``pending`` is resolved or ``deadline`` (monotonic) passes.

        Reads the primary connection itself when no other thread does, so a result goes
        from the socket to its caller without changing threads; sleeps on ``poll`` without
        holding the lead, so senders are never kept waiting by a caller waiting for a result.
        """
        started = time.monotonic()
        watching: ClientLink | None = None
        waker = thread_waker()
        pending.wakers.append(waker)  # before looking at ``done``: a result filed now wakes us
        poller = select.poll()
        try:
            while not pending.done:
                self.check_health(pending, started)
                step = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
                if step <= 0:
                    return
                if not self._take_lead():
                    with self._cond:
                        if self._leading and not pending.done:
                            self._cond.wait(step)
                    continue
                try:
                    conn = self._primary
                    if conn is not None and (conn.input.buffered() or poller.poll(0)):
                        self._read(conn)
                finally:
                    self._release_lead()
                if pending.done or conn is None:
                    if conn is None:
                        with self._cond:
                            self._cond.wait(min(step, 0.05))  # the keeper is reconnecting
                    continue
                if conn is not watching:
                    poller = select.poll()
                    poller.register(conn.input.fileno(), select.POLLIN)
                    poller.register(waker.fd, select.POLLIN)
                    watching = conn
                    continue
                # Sleep until the socket has input or another thread filed our result.
                if any(fd == waker.fd for fd, _ in poller.poll(int(step * 1000) + 1)):
                    waker.clear()
        finally:
            pending.wakers.remove(waker)

    def _read(self, conn: ClientLink) -> None:
        """File what arrived on the primary connection (we hold the lead)."""
        try:
            conn.drain()
            conn.tick()  # a long get() may be all that reads it: keep it alive
        except Exception as exc:
            if not self.broker.is_recoverable(exc):
                raise
            self._lost(exc)

    def poll(self) -> None:
        """File whatever already arrived, if no other thread is reading (for ready())."""
        if self._pid == os.getpid() and self._started and self._take_lead():
            try:
                conn = self._primary
                if conn is not None and conn.input.waiting():
                    self._read(conn)
            finally:
                self._release_lead()

    def check_health(self, pending: Pending, waiting_since: float) -> None:
        """Raise if results can't be arriving: disconnected for longer than publish_timeout
        while this caller waited (a connection about to come back gets that long)."""
        if pending.pid != os.getpid():
            raise BrokerUnavailable(
                f"the result handle for task {pending.task_id} was created in another process "
                "(before fork()); results reach the process that sent the task"
            )
        down = self.down_since
        if down is not None and time.monotonic() - max(down, waiting_since) > (
            self.config.publish_timeout
        ):
            raise BrokerUnavailable(
                f"no connection to the broker at {self.broker.display_url} for "
                f"{time.monotonic() - down:.0f}s ({self._down_reason}); the result of task "
                f"{pending.task_id} may still arrive: call get() again once the broker is back"
            )

    # -- filing results -----------------------------------------------------------------------

    def _file(self, delivery: Delivery) -> None:
        task_id = delivery.correlation_id
        try:
            meta = serialization.decode(delivery.content_type, delivery.body, self._accept)
            if not isinstance(meta, dict) or "status" not in meta:
                raise DecodeError("not a result message (no 'status')")
        except Exception as exc:
            log.warning("result message for task %s could not be read: %s", task_id, exc)
            meta = _failure_meta(task_id or "", exc)
        task_id = task_id or meta.get("task_id")
        status = meta.get("status")
        final = status in states.READY_STATES
        with self._registry:
            if not task_id:
                pending = None
            elif final:
                pending = self._pending.get(task_id)
                if pending is not None and not pending.gathers:
                    del self._pending[task_id]
            else:
                pending = self._pending.get(task_id)
        if pending is None:
            log.debug("dropping result for task %s: nobody waits for it (duplicate?)", task_id)
            return
        if final:
            pending.resolve(meta)
            with self._cond:
                self._cond.notify_all()  # a waiter that is not reading may be waiting for it
        else:
            pending.state = str(status)

    def _fail_all_pending(self, closed: bool = False) -> None:
        with self._registry:
            lost = list(self._pending.values())
            self._pending.clear()
        for pending in lost:
            if closed:
                why = f"the client was closed before the result of task {pending.task_id} came"
            else:
                why = (
                    f"the reply queue {self.queue} was deleted (by hand, by broker data loss, "
                    "or by reply_queue_expires passing while this client was away): the result "
                    f"of task {pending.task_id} may have been lost. Tasks are at-least-once: "
                    "sending it again is safe if it is idempotent."
                )
            pending.resolve(_failure_meta(pending.task_id, ResultUnavailable(why)))
        if lost and not closed:
            log.error("reply queue %s was lost; failed %d pending result(s)", self.queue, len(lost))
        with self._cond:
            self._cond.notify_all()

    # -- the keeper thread --------------------------------------------------------------------

    def _keep(self, stopping: threading.Event) -> None:
        delay = 0.1
        while not stopping.wait(KEEPER_TICK if self._primary is not None else delay):
            if not self._take_lead():
                continue  # someone else is reading: nothing to do
            try:
                if self._primary is None:
                    delay = self._reconnect(delay)
                    continue
                self._primary.drain()
                self._primary.tick()
            except Exception as exc:
                if stopping.is_set():
                    break
                self._lost(exc)
            finally:
                self._release_lead()
        if stopping is self._stopping:  # not if close() gave up on it and started over
            self._shutdown()

    def _reconnect(self, delay: float) -> float:
        try:
            self._primary = self._connect(
                must_exist=True, deadline=time.monotonic() + self.config.connect_timeout
            )
        except Exception as exc:
            self._down_reason = self.broker.describe(exc)
            return min(delay * 2, 1.0)
        self.down_since = None
        log.warning("reconnected to %s", self.broker.display_url)
        return 0.1

    # -- closing and forking --------------------------------------------------------------------

    def close(self) -> None:
        """Stop listening and delete the reply queue (nothing can arrive for it any more)."""
        keeper = self._keeper
        if keeper is None or self._pid != os.getpid():
            return
        self._stopping.set()
        keeper.join(timeout=5)
        self._fail_all_pending(closed=True)  # nothing can arrive for them any more
        self._reset()  # a send after close() starts over with a new reply queue

    def _shutdown(self) -> None:
        with self._cond:
            while self._leading:
                self._cond.wait(1.0)
            self._leading = True
        conn, self._primary = self._primary, None
        if conn is None:
            return
        with contextlib.suppress(Exception):  # best effort: x-expires deletes it anyway
            conn.delete_replies(self.queue)
        conn.close()

    def after_fork(self) -> None:
        """In a forked child: new locks and state (see App); nothing of the parent's used."""
        if self._pid != os.getpid():
            self._after_fork()

    def _after_fork(self) -> None:
        # The parent's connection and thread are not ours: drop them untouched. _reset()
        # makes new locks rather than taking the inherited ones, which a parent thread may
        # have held at the fork.
        if self._primary is not None:
            self._primary.abandon()
        self._reset()
