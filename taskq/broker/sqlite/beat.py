"""A scheduler's link to the embedded broker (:class:`~taskq.broker.base.BeatLink`).

* Who is active: an exclusive ``fcntl`` lock on a file beside the database, one per schedule
  (``<db>-taskq/beat-<schedule>.lock``). The kernel drops it the moment its process dies,
  however it dies (kill -9 included): a standby trying every half second takes over at once.
  POSIX record locks belong to a process (two links of one process would both get it), so a
  process also remembers which schedules it leads.
* What was fired: the ``beat`` table, ``(schedule, entry) -> last_due``. A fire stores the
  task message and the new ``last_due`` in one transaction: both or neither, so the
  embedded broker never stores a fire twice. The record only moves forward.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ...message import Envelope
from ..base import BeatLink
from .client import SqliteClient, copies_of, insert_message

if TYPE_CHECKING:
    from . import SqliteBroker

#: Schedules this process leads, by lock file (see the module's docstring).
_leading: set[str] = set()
_leading_lock = threading.Lock()

RECORD = (
    "INSERT INTO beat (schedule, entry, last_due) VALUES (?, ?, ?) "
    "ON CONFLICT (schedule, entry) DO UPDATE SET last_due = excluded.last_due "
    "WHERE excluded.last_due > beat.last_due"
)
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def lock_path(broker: SqliteBroker, schedule: str) -> Path:
    name = schedule if _PLAIN_NAME.fullmatch(schedule) and not schedule.startswith(".") \
        else hashlib.sha256(schedule.encode()).hexdigest()[:32]
    return Path(f"{broker.path}-taskq") / f"beat-{name}.lock"


class SqliteBeatLink(BeatLink):
    tick_interval = 60.0

    def __init__(self, broker: SqliteBroker, timeout: float) -> None:
        self.broker = broker
        self.store = broker.store
        self.timeout = timeout
        self.client = SqliteClient(broker)  # the file's checks, now; routing-key copies
        #: Lock file -> its descriptor, for the schedules this link leads.
        self._locks: dict[str, int] = {}

    def lead(self, schedule: str) -> bool:
        path = str(lock_path(self.broker, schedule))
        if path in self._locks:
            return True
        with _leading_lock:
            if path in _leading:  # another link of this process leads it
                return False
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)  # this process holds no lock on the file: closing drops none
                return False
            _leading.add(path)
        self._locks[path] = fd
        return True

    def last_fired(self, schedule: str, entries: Sequence[str]) -> dict[str, float]:
        wanted = set(entries)
        rows = self.store.read("SELECT entry, last_due FROM beat WHERE schedule = ?",
                               (schedule,))
        return {entry: float(due) for entry, due in rows if entry in wanted}

    def fire(self, schedule: str, entry: str, due: float, envelope: Envelope | None) -> None:
        deadline = time.monotonic() + self.timeout
        copies: list[Envelope] = []
        if envelope is not None:
            copies = copies_of(self.broker, envelope)
            self.broker.register_queues({copy.queue for copy in copies})
        with self.store.write(deadline) as conn:
            found = conn.execute("SELECT last_due FROM beat WHERE schedule = ? AND entry = ?",
                                 (schedule, entry)).fetchone()
            if found is not None and found[0] >= due:
                return  # recorded already: fired (or skipped) before
            now = time.time()
            for copy in copies:
                conn.execute(*insert_message(copy, now))
            conn.execute(RECORD, (schedule, entry, due))
        if len(copies) == 1:
            self.broker.waker.wake_one(copies[0].queue)
        elif copies:
            self.broker.waker.wake({copy.queue for copy in copies})

    def tick(self) -> None:
        pass

    def close(self) -> None:
        with _leading_lock:
            for path, fd in self._locks.items():
                with contextlib.suppress(OSError):
                    os.close(fd)  # drops the lock
                _leading.discard(path)
            self._locks.clear()
        self.client.close()
