"""A worker slot's link to the embedded broker: claim one message, run it, settle it.

A claim is a transaction that marks the message held by this process (its holder id, see
:mod:`.liveness`); settling it is a transaction that writes the result (if its caller's reply
queue still exists) and deletes the message, together: a result and its ack are one commit.
The slot holds one claim at most, so it never holds a message it is not running. If the
process dies, whoever sweeps next (its supervisor at once, any other slot within seconds)
puts the message back in its queue, counting a lost run; while it lives, nobody does, however
long the task runs. Delayed messages wait in the same table until their ``due`` time; the
slot sleeps until the earliest one or until woken.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from ...message import Delivery, Envelope
from ..base import NOTHING_AFTER, After, DeliveryCallback, Reply, SlotLink
from .client import copies_of, insert_message
from .names import home_queue, is_member
from .store import decode_props, encode_props
from .wake import FALLBACK, Listener, ListenerReadiness

if TYPE_CHECKING:
    import sqlite3

    from . import SqliteBroker

#: The open slot links of this process: who owns what its holder id holds.
_LINKS: weakref.WeakSet[SqliteSlot] = weakref.WeakSet()

#: How often an idle slot looks for processes that died holding messages (seconds).
SWEEP_EVERY = 2.0
#: How often a slot looks at its worker's broadcast queue unasked (seconds).
MEMBER_EVERY = 1.0

CLAIM = (
    "UPDATE messages SET holder = ?, deliveries = deliveries + 1 WHERE id = ("
    "SELECT id FROM messages WHERE queue = ? AND holder IS NULL AND due <= ? "
    "ORDER BY due, id LIMIT 1) RETURNING id, body, props, deliveries, lost, priority"
)
#: On a priority queue: the highest priority first (the partial index holds only messages
#: with one), then the oldest. Same parameters as CLAIM.
CLAIM_RANKED = (
    "UPDATE messages SET holder = ?1, deliveries = deliveries + 1 WHERE id = COALESCE(("
    "SELECT id FROM messages WHERE queue = ?2 AND holder IS NULL AND priority > 0 "
    "AND due <= ?3 ORDER BY priority DESC, due, id LIMIT 1), ("
    "SELECT id FROM messages WHERE queue = ?2 AND holder IS NULL AND due <= ?3 "
    "ORDER BY due, id LIMIT 1)) RETURNING id, body, props, deliveries, lost, priority"
)


def _first_send(conn: sqlite3.Connection, envelope: Envelope, now: float) -> bool:
    """Whether a workflow (``once``) message is sent for the first time under its task id
    (a step whose message came twice sends its next step once); others always are."""
    return not envelope.once or conn.execute(
        "INSERT OR IGNORE INTO sent (task_id, at) VALUES (?, ?)", (envelope.task_id, now)
    ).rowcount == 1


#: The delivery a reply addressed elsewhere is filed for (its ``to`` says where).
_NOBODY = Delivery(b"", None, {}, None, None, False, "")


class SqliteSlot(SlotLink):
    tick_interval = 1.0

    def __init__(
        self, broker: SqliteBroker, queues: Sequence[str], on_delivery: DeliveryCallback,
        name: str,
    ) -> None:
        self.broker = broker
        self.store = broker.store
        #: The worker's broadcast queue, looked at when a wake-up says a broadcast waits
        #: (and every MEMBER_EVERY seconds): not in every claim, which would cost a query.
        self.member = next((q for q in queues if is_member(q)), None)
        self.queues = [q for q in queues if not is_member(q)]
        self._on_delivery = on_delivery
        self.holder = broker.holder()
        broker.register_queues(queues)
        self.listener = Listener(
            broker.wake_dir, queues, f"s-{self.holder:x}-{id(self):x}"
        )
        self._member_look = 0.0  # when to look at the broadcast queue next (monotonic)
        self.input = ListenerReadiness(self.listener)
        self.opened_at = time.monotonic()
        self._active = False
        self._held: Any = None
        self._turn = 0
        self._next_due: float | None = None
        self._next_sweep = time.monotonic() + SWEEP_EVERY
        self._last_look = time.monotonic()
        self._all = [*self.queues, *([self.member] if self.member else [])]
        #: How much is due, in the work queues or in all (the broadcast queue too).
        self._earliest = {
            len(queues): "SELECT MIN(due) FROM messages WHERE queue IN "
                         f"({','.join('?' * len(queues))}) AND holder IS NULL"
            for queues in (self.queues, self._all)
        }
        ceiling = broker.config.max_priority_for
        self._claims = {q: CLAIM_RANKED if ceiling(q) else CLAIM for q in self._all}
        self._started = False
        _LINKS.add(self)

    def _give_back_orphans(self) -> None:
        """Put back what this process holds through no live link: what a link of this
        process held when it was dropped (a settle that failed, a message handed over but not
        started). On RabbitMQ the broker does this when a connection closes; here the holder
        is the process, which lives on. The message comes back marked redelivered (a run that
        had finished is settled without running again; see Slot.finished_unsettled).

        Done when the link first starts taking messages, which its slot does only once it
        runs nothing: a task still running from the dropped link (in the slot's executor)
        keeps its message until it has finished, so it is never run twice at once."""
        with self.store.write() as conn:
            held = {row[0] for row in conn.execute(
                "SELECT id FROM messages WHERE holder = ?", (self.holder,))}
            owned = {link._held for link in list(_LINKS)
                     if link.holder == self.holder and link.store.path == self.store.path}
            queues = [
                conn.execute("UPDATE messages SET holder = NULL WHERE id = ? AND holder = ? "
                             "RETURNING queue", (message_id, self.holder)).fetchone()[0]
                for message_id in sorted(held - owned)
            ]
        if queues:
            self.broker.waker.wake(queues)

    # -- taking messages ---------------------------------------------------------------------

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._give_back_orphans()
        self._active = True
        self.drain()

    def pause(self) -> None:
        self._active = False

    def drain(self) -> None:
        self.listener.clear()
        if self._active and self._held is None:
            self._claim()

    def _claim(self) -> None:
        self._last_look = time.monotonic()
        now = time.time()
        queues = self._all if self._member_due() else self.queues
        ready = self.store.read(self._earliest[len(queues)], queues)
        earliest = ready[0][0] if ready else None
        if earliest is None or earliest > now:
            self._next_due = earliest
            return
        with self.store.write() as conn:
            taken = self._take(conn)
        self._hand_over(taken)

    def _take(self, conn: sqlite3.Connection) -> tuple[str, Any] | None:
        """Claim the next due message of our queues, in turn (in the caller's transaction).

        "Due" is reckoned from now, read inside the transaction: every message committed
        before it began has a due time before that, so a look finds everything committed
        before it (a sender may skip waking anyone for a message that such a look will find).
        """
        self._last_look = time.monotonic()
        now = time.time()
        if self.member is not None and self._member_due():
            self.listener.broadcast = False
            self._member_look = self._last_look + MEMBER_EVERY
            row = conn.execute(CLAIM, (self.holder, self.member, now)).fetchone()
            if row is not None:
                self._held = row[0]
                return self.member, row
        for step in range(len(self.queues)):
            queue = self.queues[(self._turn + step) % len(self.queues)]
            row = conn.execute(self._claims[queue], (self.holder, queue, now)).fetchone()
            if row is not None:
                self._turn = (self._turn + step + 1) % len(self.queues)
                self._held = row[0]
                return queue, row
        return None

    def _hand_over(self, taken: tuple[str, Any] | None) -> None:
        if taken is None:
            return
        self._next_due = None
        queue, (message_id, body, props_text, deliveries, lost, priority) = taken
        props = decode_props(props_text)
        self._on_delivery(Delivery(
            body=body,
            content_type=props.get("content_type"),
            headers=props.get("headers") or {},
            correlation_id=props.get("correlation_id"),
            reply_to=props.get("reply_to"),
            redelivered=deliveries > 1,
            queue=queue,
            tag=message_id,
            properties={"content_encoding": props.get("content_encoding"), "lost": lost,
                        "priority": priority},
        ))

    def admit(self, key: str, interval: float) -> bool:
        with self.store.write() as conn:
            now = time.time()
            row = conn.execute("SELECT last FROM rates WHERE key = ?", (key,)).fetchone()
            # (a last start in the future: the clock went back; don't stall for that long)
            if row is not None and now - interval < row[0] <= now + interval:
                return False
            conn.execute("INSERT OR REPLACE INTO rates (key, last) VALUES (?, ?)", (key, now))
        return True

    def ready_now(self) -> bool:
        rows = self.store.read(
            f"SELECT 1 FROM messages WHERE queue IN ({','.join('?' * len(self._all))}) "
            "AND holder IS NULL AND due <= ? LIMIT 1", [*self._all, time.time()])
        return bool(rows)

    def _member_due(self) -> bool:
        return self.member is not None and (
            self.listener.broadcast or time.monotonic() >= self._member_look)

    def next_wakeup(self) -> float | None:
        """Until the earliest delayed message is due and, while idle, at most until FALLBACK
        seconds after the last look (a missed wake-up). A busy slot looks when it settles."""
        wait = None
        if self._active and self._held is None:
            wait = max(0.0, self._last_look + FALLBACK - time.monotonic())
        if self._next_due is not None:
            due = max(0.0, self._next_due - time.time())
            wait = due if wait is None else min(wait, due)
        return wait

    def tick(self) -> None:
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + SWEEP_EVERY
            self.broker.sweep()

    def keepalive(self) -> None:
        pass  # liveness is the kernel's lock: nothing to renew while a task runs

    # -- settling ----------------------------------------------------------------------------

    def _reply_row(self, conn: sqlite3.Connection, delivery: Delivery, reply: Reply) -> bool:
        """File the result in its caller's reply queue (if that still exists); whether the
        caller needs waking for it: not if an older result waits there unread, for the
        caller was woken for that one and its read (a later transaction) takes both."""
        queue = reply.to or delivery.reply_to
        if not queue:
            return False
        props = encode_props({
            "content_type": reply.content_type,
            "correlation_id": reply.correlation_id or delivery.correlation_id
            or delivery.task_id or "",
        })
        cursor = conn.execute(
            "INSERT INTO replies (queue, body, props) SELECT ?, ?, ? "
            "WHERE EXISTS (SELECT 1 FROM reply_queues WHERE name = ?)",
            (queue, reply.body, props, queue),
        )
        if cursor.rowcount != 1:
            return False  # the caller is gone
        return conn.execute("SELECT 1 FROM replies WHERE queue = ? AND id < ? LIMIT 1",
                            (queue, cursor.lastrowid)).fetchone() is None

    def _release(self, conn: sqlite3.Connection, delivery: Delivery) -> tuple[str, Any] | None:
        """Let the held message go; claim the next one in the same commit (as a broker pushes
        the next after an ack), unless paused."""
        conn.execute("DELETE FROM messages WHERE id = ? AND holder = ?",
                     (delivery.tag, self.holder))
        self._held = None
        return self._take(conn) if self._active else None

    def _done(self, taken: tuple[str, Any] | None, woken: list[str]) -> None:
        if woken:
            self.broker.waker.wake(woken)
        if taken is not None:
            self._hand_over(taken)
        elif self._active:
            self._next_due = None
            self._claim()  # nothing was due then: when is something?

    def _file_reply(self, conn: sqlite3.Connection, delivery: Delivery, reply: Reply | None,
                    woken: list[str]) -> None:
        if reply is not None and self._reply_row(conn, delivery, reply):
            woken.append(reply.to or delivery.reply_to or "")

    def settle(self, delivery: Delivery, reply: Reply | None, after: After = NOTHING_AFTER) -> None:
        woken: list[str] = []
        if after is not NOTHING_AFTER:
            after = self._routed(after)
        with self.store.write() as conn:
            self._file_reply(conn, delivery, reply, woken)
            if after is not NOTHING_AFTER:
                self._store_after(conn, after, woken)
            taken = self._release(conn, delivery)
        self._done(taken, woken)

    def _routed(self, after: After) -> After:
        """``after`` with its messages one per queue (a topic send: one per bound queue;
        raise Unroutable if none is), their queues registered."""
        messages = [copy for message in after.messages for copy in copies_of(self.broker, message)]
        join = after.join
        if join is not None:  # a workflow message runs once: one queue is enough
            join = replace(join, callback=copies_of(self.broker, join.callback)[0])
        self.broker.register_queues([m.queue for m in messages]
                                    + ([join.callback.queue] if join else []))
        return replace(after, messages=tuple(messages), join=join)

    def _store_after(self, conn: sqlite3.Connection, after: After, woken: list[str]) -> None:
        """In the settle's own transaction: a workflow's next messages are stored with the
        ack, once; so is a chord's callback, by the settle that brings its last part."""
        now = time.time()
        for envelope in after.messages:
            if _first_send(conn, envelope, now):
                conn.execute(*insert_message(envelope, now))
                woken.append(envelope.queue)
        for notice in after.replies:
            if self._reply_row(conn, _NOBODY, notice):
                woken.append(notice.to or "")
        join = after.join
        if join is None:
            return
        conn.execute("INSERT OR IGNORE INTO chord_parts (chord, idx, body, created) "
                     "VALUES (?, ?, ?, ?)", (join.chord, join.index, join.part, now))
        (count,) = conn.execute("SELECT count(*) FROM chord_parts WHERE chord = ?",
                                (join.chord,)).fetchone()
        if count < join.size or not _first_send(conn, join.callback, now):
            return
        parts = [row[0] for row in conn.execute(
            "SELECT body FROM chord_parts WHERE chord = ? ORDER BY idx", (join.chord,))]
        callback = join.complete(parts)
        conn.execute(*insert_message(callback, now))
        conn.execute("DELETE FROM chord_parts WHERE chord = ?", (join.chord,))
        woken.append(callback.queue)

    def reply(self, delivery: Delivery, reply: Reply) -> None:
        woken: list[str] = []
        with self.store.write() as conn:
            self._file_reply(conn, delivery, reply, woken)
        if woken:
            self.broker.waker.wake(woken)

    def dead_letter(
        self, delivery: Delivery, exc_type: str, reason: str, worker: str, reply: Reply | None
    ) -> str:
        props = encode_props({
            "headers": delivery.headers,
            "content_type": delivery.content_type,
            "content_encoding": delivery.properties.get("content_encoding"),
            "correlation_id": delivery.correlation_id,
            "reply_to": delivery.reply_to,
        })
        woken: list[str] = []
        with self.store.write() as conn:
            conn.execute(
                "INSERT INTO dead (queue, body, props, exception, reason, dead_at, worker) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (home_queue(delivery.queue, delivery.headers), delivery.body, props, exc_type,
                 reason, datetime.now(timezone.utc).isoformat(), worker),
            )
            self._file_reply(conn, delivery, reply, woken)
            taken = self._release(conn, delivery)
        self._done(taken, woken)
        return self.broker.dead_letter_name(home_queue(delivery.queue, delivery.headers))

    def forward(self, delivery: Delivery, envelope: Envelope, reply: Reply | None) -> None:
        woken = [envelope.queue]
        with self.store.write() as conn:
            conn.execute(*insert_message(envelope, time.time()))
            self._file_reply(conn, delivery, reply, woken)
            taken = self._release(conn, delivery)
        self._done(taken, woken)

    def requeue_lost(self, delivery: Delivery) -> None:
        with self.store.write() as conn:
            conn.execute("UPDATE messages SET holder = NULL, lost = lost + 1 "
                         "WHERE id = ? AND holder = ?", (delivery.tag, self.holder))
            self._held = None
            taken = self._take(conn) if self._active else None
        self._done(taken, [delivery.queue])

    def lost_runs(self, delivery: Delivery) -> int:
        return int(delivery.properties.get("lost") or 0)

    def run_record(self, delivery: Delivery) -> bytes:
        return str(self.holder).encode()

    # -- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        _LINKS.discard(self)  # what it still holds is given back by the next link opened
        self.listener.close()

    def drop(self) -> None:
        self.close()
