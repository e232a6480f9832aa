"""A client's link to the embedded broker: a committed insert is a confirmed publish, and the
process's reply queue is a set of rows that the workers' results are written to.

``.delay()`` returns once the message's transaction has committed (durable as the file's
``synchronous`` setting says), then wakes whoever waits for its queue. Results are read when
the reply queue's socket is woken, or every :data:`~.wake.FALLBACK` seconds regardless.
"""

from __future__ import annotations

import dataclasses
import os
import select
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ...errors import Unroutable
from ...message import Delivery, Envelope
from ..base import ClientLink
from .names import is_member
from .store import decode_props, encode_props
from .wake import BROADCAST, FALLBACK, WAKE, Listener

if TYPE_CHECKING:
    from . import SqliteBroker


def message_row(envelope: Envelope, now: float) -> tuple[str, float, bytes, str]:
    props = {
        "headers": envelope.headers,
        "content_type": envelope.content_type,
        "content_encoding": envelope.content_encoding,
        "correlation_id": envelope.correlation_id,
        "reply_to": envelope.reply_to,
    }
    return envelope.queue, now + max(0.0, envelope.delay), envelope.body, encode_props(props)


INSERT_MESSAGE = "INSERT INTO messages (queue, due, body, props) VALUES (?, ?, ?, ?)"
#: The same with a priority, cut to the queue's range (none: 0), as RabbitMQ does.
INSERT_RANKED = (
    "INSERT INTO messages (queue, due, body, props, priority) VALUES (?, ?, ?, ?, "
    "MIN(?, COALESCE((SELECT max_priority FROM queues WHERE name = ?), 0)))"
)


def insert_message(envelope: Envelope, now: float) -> tuple[str, tuple[Any, ...]]:
    """The statement storing ``envelope``, and its parameters."""
    row = message_row(envelope, now)
    if envelope.priority:
        return INSERT_RANKED, (*row, envelope.priority, envelope.queue)
    return INSERT_MESSAGE, row
#: An older message of the queue, due and unclaimed, after ours was committed. Then nobody
#: needs waking for ours: every idle slot of that queue was woken for the older one and has
#: not looked since (a slot that had looked would hold it), and every busy slot looks when
#: it settles; a look takes the oldest due message, then the next. A wake-up per message of
#: a burst would only interrupt busy slots.
BACKLOG = ("SELECT 1 FROM messages WHERE queue = ? AND holder IS NULL AND due <= ? "
           "AND id < ? LIMIT 1")


def copies_of(broker: SqliteBroker, envelope: Envelope) -> list[Envelope]:
    """The messages to store for ``envelope``: itself for one sent to a queue; one copy per
    queue bound to a matching pattern for one sent by routing key; one per live worker of
    its queue for a broadcast. Raises Unroutable if there are none."""
    if envelope.routing_key is None and not envelope.broadcast:
        return [envelope]
    if envelope.broadcast:
        queues = broker.members(envelope.queue)
        if not queues:
            raise Unroutable(
                f"broadcast {envelope.task_id} was not sent: no worker of queue "
                f"{envelope.queue!r} is up to receive it"
            )
    else:
        queues = broker.bound_queues(envelope.routing_key or "")
        if not queues:
            raise Unroutable(
                f"task {envelope.task_id} was not queued: no queue is bound to a pattern "
                f"that routing key {envelope.routing_key!r} matches (bind one: taskq "
                "worker -Q QUEUE --bind PATTERN)"
            )
    return [dataclasses.replace(envelope, queue=q, routing_key=None, broadcast=False)
            for q in queues]


class _Readiness:
    """The reply queue's socket, plus a look every FALLBACK seconds (buffered() says when)."""

    def __init__(self) -> None:
        self.listener: Listener | None = None
        self.next_look = time.monotonic() + FALLBACK
        self._poll = select.poll()

    def attach(self, listener: Listener) -> None:
        self.listener = listener
        self._poll.register(listener.fileno(), select.POLLIN)

    def fileno(self) -> int:
        return self.listener.fileno() if self.listener is not None else -1

    def buffered(self) -> bool:
        return self.listener is not None and time.monotonic() >= self.next_look

    def waiting(self) -> bool:
        return self.buffered() or (self.listener is not None and bool(self._poll.poll(0)))


class SqliteClient(ClientLink):
    tick_interval = 60.0

    def __init__(self, broker: SqliteBroker) -> None:
        self.broker = broker
        self.store = broker.store
        self.pid = os.getpid()
        self.blocked = None
        self.readiness = _Readiness()
        self.input = self.readiness
        self.store.connection()  # the file's checks, now: a clear error at the first send
        self._queue: str | None = None
        self._on_reply: Callable[[Delivery], None] | None = None

    # -- publishing --------------------------------------------------------------------------

    def publish(self, envelope: Envelope, deadline: float) -> None:
        if envelope.routing_key is not None or envelope.broadcast:
            copies = copies_of(self.broker, envelope)
            with self.store.write(deadline) as conn:
                for copy in copies:
                    conn.execute(*insert_message(copy, time.time()))
            self.broker.waker.wake({copy.queue for copy in copies},
                                   BROADCAST if envelope.broadcast else WAKE)
            return
        self.broker.register_queues((envelope.queue,))
        statement, row = insert_message(envelope, time.time())
        message_id = self.store.write_one(statement, row, deadline)
        if envelope.delay > 0 or not self.store.read(BACKLOG, (row[0], row[1], message_id)):
            self.broker.waker.wake_one(envelope.queue)

    def publish_many(
        self, envelopes: Sequence[Envelope], deadline: float, confirmed: set[str]
    ) -> dict[str, str]:
        refused: dict[str, str] = {}
        if any(e.routing_key is not None or e.broadcast for e in envelopes):
            direct: list[Envelope] = []
            for envelope in envelopes:
                try:
                    direct += copies_of(self.broker, envelope) \
                        if envelope.routing_key is not None or envelope.broadcast else [envelope]
                except Unroutable as exc:
                    refused[envelope.task_id] = str(exc)
            envelopes = direct
        self.broker.register_queues({e.queue for e in envelopes})
        now = time.time()
        with self.store.write(deadline) as conn:
            if any(e.priority for e in envelopes):
                conn.executemany(INSERT_RANKED, [
                    (*message_row(e, now), e.priority or 0, e.queue) for e in envelopes])
            else:
                conn.executemany(INSERT_MESSAGE, [message_row(e, now) for e in envelopes])
        confirmed.update(e.task_id for e in envelopes)
        queues = {e.queue for e in envelopes}
        members = {q for q in queues if is_member(q)}
        self.broker.waker.wake(queues - members)
        self.broker.waker.wake(members, BROADCAST)
        return refused

    # -- the reply queue ---------------------------------------------------------------------

    def consume_replies(
        self, queue: str, expires: float, on_reply: Callable[[Delivery], None], *,
        must_exist: bool,
    ) -> bool:
        holder = self.broker.holder()
        with self.store.write() as conn:
            existed = conn.execute(
                "SELECT 1 FROM reply_queues WHERE name = ?", (queue,)).fetchone() is not None
            conn.execute("INSERT OR REPLACE INTO reply_queues (name, holder) VALUES (?, ?)",
                         (queue, holder))
        listener = Listener(self.broker.wake_dir, (queue,), f"r-{holder:x}-{id(self):x}")
        self.readiness.attach(listener)
        self._queue, self._on_reply = queue, on_reply
        return existed or not must_exist

    def drain(self) -> None:
        """File the results that arrived (when woken, or every FALLBACK seconds)."""
        if self._queue is None or self.readiness.listener is None:
            return
        woken = self.readiness.listener.clear()
        if not woken and time.monotonic() < self.readiness.next_look:
            return
        self.readiness.next_look = time.monotonic() + FALLBACK
        if not woken and not self.store.read(
            "SELECT 1 FROM replies WHERE queue = ? LIMIT 1", (self._queue,)
        ):
            return  # a look without a wake-up: don't take the write lock for nothing
        with self.store.write() as conn:
            rows = conn.execute(
                "DELETE FROM replies WHERE queue = ? RETURNING body, props", (self._queue,)
            ).fetchall()
        assert self._on_reply is not None
        for body, props_text in rows:
            props = decode_props(props_text)
            self._on_reply(Delivery(
                body=body,
                content_type=props.get("content_type"),
                headers={},
                correlation_id=props.get("correlation_id"),
                reply_to=None,
                redelivered=False,
                queue=self._queue,
            ))

    def delete_replies(self, queue: str) -> None:
        with self.store.write() as conn:
            conn.execute("DELETE FROM replies WHERE queue = ?", (queue,))
            conn.execute("DELETE FROM reply_queues WHERE name = ?", (queue,))

    def tick(self) -> None:
        pass

    def close(self) -> None:
        if self.readiness.listener is not None and self.pid == os.getpid():
            self.readiness.listener.close()

    def drop(self) -> None:
        self.close()

    def abandon(self) -> None:
        """A child keeps its parent's socket file alone (the parent still listens there)."""
        self.readiness.listener = None
