"""The embedded broker: one SQLite file, no server, the same promises as on RabbitMQ.

``sqlite:///taskq.db`` (relative to the working directory; the default when no URL is given)
or ``sqlite:////absolute/path.db``. Made for one machine: a laptop, one server, a CI job, a
small deployment. Several machines need RabbitMQ (``amqp://...``), the same code otherwise.

* :mod:`.store`: the file, its checks and schema, bounded transactions;
* :mod:`.liveness`: who holds which message, and whether they are alive (kernel locks);
* :mod:`.wake`: waking waiters with a datagram instead of polling;
* :mod:`.client`, :mod:`.slot`, :mod:`.admin`, :mod:`.beat`: the links of
  :mod:`taskq.broker.base`.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ...config import Config
from ...errors import DeclarationConflict
from ...routing import topic_matches
from ..base import Admin, BeatLink, Broker, ControlLink, DeliveryCallback, WorkerSupport
from . import liveness
from .names import member_queue
from .store import Store, parse_url
from .wake import Waker, wake_dir

__all__ = ["SqliteBroker"]


log = logging.getLogger("taskq.broker")


class SqliteBroker(Broker):
    unreachable_hint = "Is the file on a local disk, and writable?"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.path, self.synchronous = parse_url(config.broker_url)
        self.store = Store(self.path, self.synchronous, timeout=config.publish_timeout)
        self.live_path = Path(f"{self.path}-taskq") / "live"
        self.wake_dir = wake_dir(self.path)
        self._waker: Waker | None = None
        self._registered_queues: set[str] = set()
        self._holder_pid = 0

    @property
    def location(self) -> str:
        return f"sqlite:///{self.path} (embedded; synchronous={self.synchronous})"

    @property
    def waker(self) -> Waker:
        if self._waker is None:
            self._waker = Waker(self.wake_dir)
        return self._waker

    # -- who holds messages ------------------------------------------------------------------

    def holder(self) -> int:
        """This process's holder id, registered in the file on first use."""
        self.store.connection()  # the file's checks first: a clear error, not a lock failure
        self.live_path.parent.mkdir(parents=True, exist_ok=True)
        holder, new = liveness.my_holder(self.live_path)
        if new or self._holder_pid != os.getpid():
            with self.store.write() as conn:
                conn.execute(
                    "INSERT OR REPLACE INTO holders (id, pid, host, started) VALUES (?, ?, ?, ?)",
                    (holder, os.getpid(), socket.gethostname(), time.time()),
                )
            self._holder_pid = os.getpid()
        return holder

    def sweep(self, *, only: int | None = None, count: bool = True) -> int:
        """Give back what dead holders held: their messages return to their queues (a lost
        run counted for each, unless ``count`` is False), their reply queues are deleted.
        ``only``: that holder (known dead), else every holder found dead. Returns how many
        messages went back."""
        if only is not None:
            dead = [only]
        else:
            rows = self.store.read(
                "SELECT id FROM holders UNION SELECT holder FROM reply_queues "
                "UNION SELECT DISTINCT holder FROM messages WHERE holder IS NOT NULL "
                "UNION SELECT holder FROM members"
            )
            dead = [h for (h,) in rows if not liveness.is_alive(self.live_path, h)]
        if not dead:
            return 0
        queues: list[str] = []
        with self.store.write() as conn:
            for holder in dead:
                queues += [q for (q,) in conn.execute(
                    "UPDATE messages SET holder = NULL, lost = lost + ? WHERE holder = ? "
                    "RETURNING queue", (1 if count else 0, holder))]
                conn.execute("DELETE FROM replies WHERE queue IN "
                             "(SELECT name FROM reply_queues WHERE holder = ?)", (holder,))
                conn.execute("DELETE FROM reply_queues WHERE holder = ?", (holder,))
                conn.execute("DELETE FROM holders WHERE id = ?", (holder,))
                self._drop_members(conn, [m for (m,) in conn.execute(
                    "SELECT DISTINCT member FROM members WHERE holder = ?", (holder,))])
        if queues:
            self.waker.wake(queues)
            log.warning("%d message(s) held by a process that died went back to their queues",
                        len(queues))
        return len(queues)

    def register_queues(self, queues: Iterable[str]) -> None:
        """Make the queues exist, with this app's priority range; a queue that exists with
        another range is a DeclarationConflict (RabbitMQ's rule for ``x-max-priority``)."""
        new = [q for q in set(queues) if q not in self._registered_queues]
        if not new:
            return
        ceiling = self.config.max_priority_for
        with self.store.write() as conn:
            conn.executemany(
                "INSERT OR IGNORE INTO queues (name, created, max_priority) VALUES (?, ?, ?)",
                [(q, time.time(), ceiling(q)) for q in new])
            found = conn.execute(
                f"SELECT name, max_priority FROM queues WHERE name IN ({','.join('?' * len(new))})",
                new).fetchall()
        for name, existing in found:
            if existing != ceiling(name):
                raise DeclarationConflict(
                    f"queue {name!r} already exists with different settings (max_priority "
                    f"{existing} in {self.path}, {ceiling(name)} here): a queue keeps the "
                    "priority range it was first used with; give every app the same "
                    "max_priority for it, or use another queue name"
                )
        self._registered_queues.update(new)

    def bind(self, queues: Iterable[str], patterns: Iterable[str], timeout: float) -> None:
        queues, patterns = list(queues), list(patterns)
        self.register_queues(queues)
        with self.store.write() as conn:
            conn.executemany("INSERT OR IGNORE INTO bindings (queue, pattern) VALUES (?, ?)",
                             [(q, p) for q in queues for p in patterns])

    # -- broadcasts: a queue per worker, a member of the queues it serves --------------------

    def broadcast_queue(self, hostname: str) -> str:
        return member_queue(hostname)

    def join_broadcasts(self, hostname: str, queues: Iterable[str], timeout: float) -> None:
        member = self.broadcast_queue(hostname)
        self.register_queues([member])
        holder = self.holder()  # the worker's main process: its death ends the membership
        with self.store.write() as conn:
            conn.executemany("INSERT OR REPLACE INTO members (queue, member, holder) "
                             "VALUES (?, ?, ?)", [(q, member, holder) for q in queues])

    def leave_broadcasts(self, hostname: str, timeout: float) -> None:
        with self.store.write() as conn:
            self._drop_members(conn, [self.broadcast_queue(hostname)])

    @staticmethod
    def _drop_members(conn: Any, members: list[str]) -> None:
        """Forget worker broadcast queues, with the broadcasts they had not started."""
        for member in members:
            conn.execute("DELETE FROM members WHERE member = ?", (member,))
            conn.execute("DELETE FROM messages WHERE queue = ? AND holder IS NULL", (member,))
            if not conn.execute("SELECT 1 FROM messages WHERE queue = ?", (member,)).fetchone():
                conn.execute("DELETE FROM queues WHERE name = ?", (member,))

    def members(self, queue: str) -> list[str]:
        """The broadcast queues of the live workers of ``queue``."""
        rows = self.store.read("SELECT member, holder FROM members WHERE queue = ?", (queue,))
        return sorted(m for m, holder in rows if liveness.is_alive(self.live_path, holder))

    def bound_queues(self, routing_key: str) -> list[str]:
        """The queues bound to a pattern that ``routing_key`` matches (RabbitMQ's rules)."""
        rows = self.store.read("SELECT queue, pattern FROM bindings ORDER BY queue")
        return sorted({queue for queue, pattern in rows if topic_matches(pattern, routing_key)})

    # -- the links ---------------------------------------------------------------------------

    def client_link(self, *, timeout: float, name: str = "taskq client") -> Any:
        from .client import SqliteClient

        return SqliteClient(self)

    def slot_link(
        self,
        queues: Sequence[str],
        on_delivery: DeliveryCallback,
        *,
        timeout: float,
        name: str = "taskq worker",
        state: dict[str, str] | None = None,
    ) -> Any:
        from .slot import SqliteSlot

        return SqliteSlot(self, list(queues), on_delivery, name)

    def admin(self, *, timeout: float) -> Admin:
        from .admin import SqliteAdmin

        return SqliteAdmin(self)

    def control_link(self, *, timeout: float, name: str = "taskq control") -> ControlLink:
        from .control import SqliteControl

        return SqliteControl(self, timeout, name)

    def beat_link(self, *, timeout: float) -> BeatLink:
        from .beat import SqliteBeatLink

        return SqliteBeatLink(self, timeout)

    def worker_support(self, name: str, concurrency: int) -> WorkerSupport:
        from .support import SqliteWorkerSupport

        return SqliteWorkerSupport(self)

    def check_queues(self, queues: Iterable[str], timeout: float) -> list[str]:
        self.register_queues(queues)
        return []

    def is_recoverable(self, exc: BaseException) -> bool:
        return isinstance(exc, OSError)

    def describe(self, exc: BaseException) -> str:
        text = str(exc) or type(exc).__name__
        return f"{type(exc).__name__}: {text}" if type(exc).__name__ not in text else text

    def after_fork(self) -> None:
        self.store.after_fork()
        self._waker = None
        self._registered_queues = set()
