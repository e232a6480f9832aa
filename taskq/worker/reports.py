"""What a worker's slots tell its monitor, and what the monitor tells them.

The monitor (:mod:`taskq.worker.monitor`, a thread of the supervisor) listens on a Unix
stream socket; each slot connects and sends it JSON lines, without ever waiting:

* every second or so, its counts (tasks run, by name, by queue, by outcome): absolute, so a
  report dropped costs nothing;
* while someone watches (``-E``/``enable_events``, or ``--metrics-port``), one report per
  step of each task (received, started, succeeded, failed, retried, rejected, revoked), with
  Celery's event fields.

What the socket can't take at once waits in the slot (up to :data:`MAX_PENDING` bytes; past
that, new reports are dropped) and goes at the next report or tick: reports never slow a task,
and a burst is told in full. (Datagrams would be dropped: Linux queues only
``net.unix.max_dgram_qlen`` of them per socket, 10 by default.) The monitor tells the slots what to
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
#: Reports a slot keeps while the monitor is behind (bytes); more are dropped.
MAX_PENDING = 4 * 1024 * 1024
#: A slot whose monitor is gone tries to reach it again after this long (seconds).
RECONNECT_EVERY = 1.0


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
        self._pending = bytearray()
        self._tried_at = -RECONNECT_EVERY
        self.total: dict[str, int] = {}
        self.by_queue: dict[str, int] = {}
        self.outcomes: dict[str, int] = {}
        self._counted_at = 0.0
        self._changed = False
        #: Counts change on the slot's thread; a thread of their own sends the ones a long
        #: task would hold back (started at the first count, as the slot serves).
        self._lock = threading.Lock()
        self._sending = threading.Lock()
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
        if self._flusher is None and self._path:
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
            time.sleep(COUNTS_EVERY / 10 if self._pending else COUNTS_EVERY)
            self.flush()
            with self._sending:
                self._push()

    def report(self, event: str, fields: dict[str, Any]) -> None:
        """One step of a task, while someone watches (``fields``: Celery's, plus ``name``,
        ``queue`` and ``slot_pid`` for the monitor's own use)."""
        if self.watching:
            self._send({"kind": "event", "type": event, "timestamp": time.time(),
                        "slot_pid": self.pid, **fields})

    def _send(self, report: dict[str, Any]) -> None:
        if not self._path:
            return
        data = json.dumps(report, default=str).encode()
        if len(data) > MAX_REPORT:
            for key in ("traceback", "result", "args", "kwargs", "exception"):
                if isinstance(report.get(key), str):
                    report[key] = report[key][: MAX_REPORT // 8]
            data = json.dumps(report, default=str).encode()
            if len(data) > MAX_REPORT:
                return  # still too big (huge fields of other names): not told
        with self._sending:
            if len(self._pending) + len(data) < MAX_PENDING:
                self._pending += data + b"\n"
            self._push()

    def _push(self) -> None:
        """Send what waits, as far as the socket takes it now (call with ``_sending``)."""
        if not self._pending:
            return
        if self._sock is None and not self._connect():
            return
        assert self._sock is not None
        try:
            sent = self._sock.send(self._pending)
        except BlockingIOError:
            return
        except OSError:  # the monitor is gone: keep what waits, reach it again later
            self._sock.close()
            self._sock = None
            return
        del self._pending[:sent]

    def _connect(self) -> bool:
        now = time.monotonic()
        if now - self._tried_at < RECONNECT_EVERY or not self._path:
            return False
        self._tried_at = now
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            return False
        sock.setblocking(False)
        self._sock = sock
        return True

    def close(self) -> None:
        self.flush(force=True)
        self._closed = True
        with self._sending:
            if self._sock is not None:
                with contextlib.suppress(OSError):  # the rest, if it fits at once
                    self._sock.setblocking(True)
                    self._sock.settimeout(0.2)
                    self._sock.sendall(self._pending)
                self._sock.close()
                self._sock = None


class Inbox:
    """The monitor's end: the socket the slots' reports arrive on, one connection a slot."""

    def __init__(self, path: str) -> None:
        """``path``: a file's, or (Linux) an abstract name starting with a NUL."""
        self.path = path
        if not path.startswith("\0"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(64)
        self.sock.setblocking(False)
        #: Each slot's connection, with the start of a line not read in full yet.
        self._peers: dict[socket.socket, bytearray] = {}

    def filenos(self) -> list[int]:
        return [self.sock.fileno(), *(peer.fileno() for peer in self._peers)]

    def take(self, limit: int = 10_000) -> list[dict[str, Any]]:
        self._accept()
        taken: list[dict[str, Any]] = []
        for peer, partial in list(self._peers.items()):
            while len(taken) < limit:
                try:
                    data = peer.recv(256 * 1024)
                except BlockingIOError:
                    break
                except OSError:
                    data = b""
                if not data:  # the slot is gone
                    peer.close()
                    del self._peers[peer]
                    break
                partial += data
                *lines, rest = partial.split(b"\n")
                partial[:] = rest
                for line in lines:
                    with contextlib.suppress(ValueError):
                        value = json.loads(line)
                        if isinstance(value, dict):
                            taken.append(value)
        return taken

    def _accept(self) -> None:
        while True:
            try:
                peer, _ = self.sock.accept()
            except OSError:
                return
            peer.setblocking(False)
            self._peers[peer] = bytearray()

    def close(self) -> None:
        for peer in self._peers:
            peer.close()
        self._peers.clear()
        self.sock.close()
        if not self.path.startswith("\0"):
            with contextlib.suppress(OSError):
                os.unlink(self.path)
