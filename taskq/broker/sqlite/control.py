"""Celery's monitoring protocols in the embedded broker: events, remote control, revocations.

Rows of their own tables, each woken for by a datagram (see :mod:`.wake`), under names of
their own in the wake directory:

* ``events``: each event a row; a watcher reads the rows after the last it saw. The newest
  :data:`KEPT_EVENTS` are kept (a watcher that falls further behind misses the rest).
* ``commands``: a broadcast command a row, read by every worker's monitor from the moment it
  serves; kept :data:`KEPT_COMMANDS` seconds. ``command_replies``: replies by ticket, read by
  the link that sent the command (woken under its own name).
* ``revoked``: task ids until a time.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ...errors import BrokerUnavailable
from ..base import ControlLink, command_body, decoded_body
from .wake import Listener, ListenerReadiness

if TYPE_CHECKING:
    from . import SqliteBroker

#: The wake-up names: of event watchers, of workers' monitors, of a command's sender.
EVENTS, COMMANDS, REPLIES = "taskq.events", "taskq.pidbox", "taskq.pidbox.reply."
KEPT_EVENTS = 10_000
KEPT_COMMANDS = 300.0
#: An event write waits this long at most for a busy file (then the events are dropped).
EVENT_WAIT = 0.5


class SqliteControl(ControlLink):
    def __init__(self, broker: SqliteBroker, timeout: float, name: str) -> None:
        super().__init__()
        self.broker = broker
        self.store = broker.store
        self.timeout = timeout
        self.store.connection()  # the file's checks: a clear error now
        self.oid = uuid.uuid4().hex
        self.listener = Listener(broker.wake_dir, [], f"c-{self.oid[:16]}")
        self.input = ListenerReadiness(self.listener)
        self._events_after: int | None = None
        self._commands_after: int | None = None
        self._sent_events = 0
        #: Events not told because the file stayed busy for EVENT_WAIT.
        self.dropped_events = 0

    def _deadline(self) -> float:
        return time.monotonic() + self.timeout

    # -- events ----------------------------------------------------------------------------

    def send_events(self, events: Sequence[dict[str, Any]]) -> None:
        if not events:
            return
        now = time.time()
        rows = [(now, json.dumps(event, default=str)) for event in events]
        try:
            with self.store.write(time.monotonic() + EVENT_WAIT) as conn:
                conn.executemany("INSERT INTO events (at, body) VALUES (?, ?)", rows)
                self._sent_events += len(rows)
                if self._sent_events >= 1000:  # trim now and then, not per event
                    self._sent_events = 0
                    conn.execute("DELETE FROM events WHERE id <= "
                                 "(SELECT MAX(id) FROM events) - ?", (KEPT_EVENTS,))
        except BrokerUnavailable:  # the file stayed busy: events are told at best, dropped
            self.dropped_events += len(rows)
            return
        self.broker.waker.wake_one(EVENTS)

    def watch_events(self) -> None:
        self.listener.listen(EVENTS)
        self._events_after = self._last("events")

    def _last(self, table: str) -> int:
        return int(self.store.read(f"SELECT COALESCE(MAX(id), 0) FROM {table}")[0][0])

    # -- remote control --------------------------------------------------------------------

    def serve(self, node: str) -> None:
        self.listener.listen(COMMANDS)
        self._commands_after = self._last("commands")

    def call(self, method: str, arguments: dict[str, Any], *,
             destination: Sequence[str] | None = None, reply: bool = True,
             timeout: float = 1.0) -> str:
        ticket = uuid.uuid4().hex
        reply_to = {"exchange": "reply.celery.pidbox", "routing_key": self.oid} if reply else None
        body = command_body(method, arguments, destination, ticket, reply_to)
        if reply:
            if not self._awaited:
                self.listener.listen(REPLIES + self.oid)
            self._awaited.add(ticket)
        now = time.time()
        body["expires"] = now + timeout
        with self.store.write(self._deadline()) as conn:
            conn.execute("DELETE FROM commands WHERE at < ?", (now - KEPT_COMMANDS,))
            conn.execute("DELETE FROM command_replies WHERE at < ?", (now - KEPT_COMMANDS,))
            conn.execute("INSERT INTO commands (at, body) VALUES (?, ?)",
                         (now, json.dumps(body)))
        self.broker.waker.wake_one(COMMANDS)
        return ticket

    def answer(self, command: dict[str, Any], node: str, value: Any) -> None:
        reply_to, ticket = command.get("reply_to"), command.get("ticket")
        if not isinstance(reply_to, dict) or not isinstance(ticket, str):
            return
        self.store.write_one(
            "INSERT INTO command_replies (ticket, at, body) VALUES (?, ?, ?)",
            (ticket, time.time(), json.dumps({node: value}, default=str)), self._deadline())
        self.broker.waker.wake_one(REPLIES + str(reply_to.get("routing_key")))

    def drain(self) -> None:
        self.listener.clear()
        if self._events_after is not None:
            rows = self.store.read("SELECT id, body FROM events WHERE id > ? ORDER BY id",
                                   (self._events_after,))
            for row_id, body in rows:
                self._events_after = row_id
                self._events.append(decoded_body(body))
        if self._commands_after is not None:
            now = time.time()
            rows = self.store.read("SELECT id, body FROM commands WHERE id > ? ORDER BY id",
                                   (self._commands_after,))
            for row_id, body in rows:
                self._commands_after = row_id
                command = decoded_body(body)
                expires = command.get("expires")
                if not isinstance(expires, (int, float)) or not expires or expires >= now:
                    self._commands.append(command)  # Celery's rule: past its expiry, dropped
        for ticket in list(self._awaited):
            rows = self.store.read("SELECT id, body FROM command_replies WHERE ticket = ? "
                                   "ORDER BY id", (ticket,))
            if rows:
                with self.store.write(self._deadline()) as conn:
                    conn.execute("DELETE FROM command_replies WHERE id <= ? AND ticket = ?",
                                 (rows[-1][0], ticket))
                self._replies.setdefault(ticket, []).extend(decoded_body(b) for _, b in rows)

    # -- revocations -----------------------------------------------------------------------

    def store_revoked(self, task_ids: Sequence[str], until: float) -> None:
        with self.store.write(self._deadline()) as conn:
            conn.execute("DELETE FROM revoked WHERE until < ?", (time.time(),))
            conn.executemany("INSERT OR REPLACE INTO revoked (task_id, until) VALUES (?, ?)",
                             [(task_id, until) for task_id in task_ids])

    def revoked(self) -> dict[str, float]:
        return dict(self.store.read("SELECT task_id, until FROM revoked WHERE until >= ?",
                                    (time.time(),)))

    def tick(self) -> None:
        pass

    def close(self) -> None:
        self.listener.close()


