"""What a worker's slots tell its monitor, and what the monitor tells them.

The monitor (:mod:`taskq.worker.monitor`, a thread of the supervisor) binds a Unix datagram
socket; each slot sends it, without ever waiting:

* every second or so, its counts (tasks run, by name, by queue, by outcome): absolute, so a
  datagram lost costs nothing;
* while someone watches (``-E``/``enable_events``, or ``--metrics-port``), one report per
  step of each task (received, started, succeeded, failed, retried, rejected, revoked), with
  Celery's event fields.

A full socket drops a datagram: reports never slow a task. The monitor tells the slots what to
watch and which tasks are revoked through :class:`Watch` (over a slot process's control pipe,
or directly with ``--pool threads``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from typing import Any

#: A slot's counts go out at most this often (seconds).
COUNTS_EVERY = 1.0
#: The largest report sent (bytes); longer reprs and tracebacks are cut to fit.
MAX_REPORT = 60_000


class Watch:
    """One slot's view of what its monitor wants, and its reports to it."""

    def __init__(self, socket_path: str | None, index: int) -> None:
        self.index = index
        self.events = False
        self.metrics = False
        self.revoked: dict[str, float] = {}
        self.pid = os.getpid()
        self._path = socket_path
        self._sock: socket.socket | None = None
        if socket_path:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)
        self.total: dict[str, int] = {}
        self.by_queue: dict[str, int] = {}
        self.outcomes: dict[str, int] = {}
        self._counted_at = 0.0
        self._changed = False
        #: Counts change on the slot's thread; a thread of their own sends the ones a long
        #: task would hold back (started at the first count, as the slot serves).
        self._lock = threading.Lock()
        self._flusher: threading.Thread | None = None
        self._closed = False

    @property
    def watching(self) -> bool:
        return self.events or self.metrics

    # -- told by the monitor ---------------------------------------------------------------

    def apply(self, message: tuple[Any, ...]) -> None:
        """A message from the monitor: ("watch", events, metrics) or ("revoked", {id: until})."""
        if message[0] == "watch":
            self.events, self.metrics = bool(message[1]), bool(message[2])
        elif message[0] == "revoked":
            now = time.time()
            self.revoked = {k: v for k, v in {**self.revoked, **message[1]}.items() if v >= now}

    def is_revoked(self, task_id: str | None) -> bool:
        return bool(task_id) and task_id in self.revoked

    # -- telling the monitor ---------------------------------------------------------------

    def count(self, name: str | None, queue: str, outcome: str) -> None:
        """One message done with; ``name`` None for one that named no task (not counted as
        processed: it was never a task)."""
        with self._lock:
            if name is not None:
                self.total[name] = self.total.get(name, 0) + 1
            self.by_queue[queue] = self.by_queue.get(queue, 0) + 1
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
            self._changed = True
        self.flush()
        if self._flusher is None and self._sock is not None:
            self._flusher = threading.Thread(target=self._flush_later, daemon=True,
                                             name="taskq-counts")
            self._flusher.start()

    def flush(self, *, force: bool = False) -> None:
        """Send the counts if they changed and a second passed (``force``: now)."""
        with self._lock:
            now = time.monotonic()
            if not self._changed or (not force and now - self._counted_at < COUNTS_EVERY):
                return
            self._counted_at, self._changed = now, False
            self._send({"kind": "counts", "slot": self.index, "pid": self.pid,
                        "total": self.total, "queues": self.by_queue,
                        "outcomes": self.outcomes})

    def _flush_later(self) -> None:
        while not self._closed:
            time.sleep(COUNTS_EVERY)
            self.flush()

    def report(self, event: str, fields: dict[str, Any]) -> None:
        """One step of a task, while someone watches (``fields``: Celery's, plus ``name``,
        ``queue`` and ``slot_pid`` for the monitor's own use)."""
        if self.watching:
            self._send({"kind": "event", "type": event, "timestamp": time.time(),
                        "slot_pid": self.pid, **fields})

    def _send(self, report: dict[str, Any]) -> None:
        if self._sock is None or self._path is None:
            return
        data = json.dumps(report, default=str).encode()
        if len(data) > MAX_REPORT:
            for key in ("traceback", "result", "args", "kwargs", "exception"):
                if isinstance(report.get(key), str):
                    report[key] = report[key][: MAX_REPORT // 8]
            data = json.dumps(report, default=str).encode()[:MAX_REPORT]
        with contextlib.suppress(OSError):  # full, or the monitor is gone: dropped
            self._sock.sendto(data, self._path)

    def close(self) -> None:
        self.flush(force=True)
        self._closed = True
        if self._sock is not None:
            self._sock.close()


class Inbox:
    """The monitor's end: the socket the slots' reports arrive on."""

    def __init__(self, path: str) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setblocking(False)
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)

    def fileno(self) -> int:
        return self.sock.fileno()

    def take(self, limit: int = 10_000) -> list[dict[str, Any]]:
        taken: list[dict[str, Any]] = []
        while len(taken) < limit:
            try:
                data = self.sock.recv(MAX_REPORT + 1024)
            except OSError:
                break
            with contextlib.suppress(ValueError):
                value = json.loads(data)
                if isinstance(value, dict):
                    taken.append(value)
        return taken

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
