"""Waking whoever waits for a queue: one Unix datagram per waiter, no polling interval.

Every process that waits (a slot for its queues, a client for its reply queue) binds a
datagram socket of its own and lists it under each queue it waits for: a directory per queue
beside the database, holding a link to the socket per waiter. Whoever commits a message sends
one byte to each link of that queue; the waiter polls its socket with its other descriptors,
so a task sent to an idle worker starts within about a millisecond. A waiter looks for work
after it is listed and before it sleeps, so a message is never missed between the two; a
dead waiter's link answers "connection refused" and is removed by the sender. Waiters still
look every few seconds (:data:`FALLBACK`), in case a datagram could not be sent (a full
buffer, another user's directory).

Socket addresses are limited to 107 bytes: when the database's path is too long for that,
the directory lives under the temporary directory instead, named after the database.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import socket
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

#: How often a waiter looks even when nobody woke it (seconds).
FALLBACK = 2.0
#: The byte of a wake-up; BROADCAST's says a broadcast waits (a waiter looks for those only
#: when told, or now and then: they are rare, and a look costs a query).
WAKE, BROADCAST = b"\0", b"b"
#: The longest socket address the kernel takes (sun_path holds 108 bytes with the NUL).
_MAX_SOCKET_PATH = 107
#: The longest address used under the wake directory: a waiter's link in a queue's folder,
#: ``/<16-hex queue key>/<waiter name>``, a name being at most ``r-<16 hex>-<16 hex>``.
_LONGEST_ADDRESS = 1 + 16 + 1 + 36


def wake_dir(database: Path) -> Path:
    beside = Path(f"{database}-taskq") / "wake"
    if len(os.fsencode(beside)) + _LONGEST_ADDRESS <= _MAX_SOCKET_PATH:
        return beside
    digest = hashlib.sha256(str(database).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"taskq-{os.getuid()}" / digest / "wake"


def queue_key(queue: str) -> str:
    return hashlib.sha256(queue.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class Waker:
    """Sends the wake-ups (one per process; thread-safe)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._lock = threading.Lock()
        self._folders: dict[str, str] = {}  # queue -> its folder's path (a hash to compute)

    def _folder(self, queue: str) -> str:
        folder = self._folders.get(queue)
        if folder is None:
            if len(self._folders) > 10_000:
                self._folders.clear()  # reply queues come and go: keep the cache bounded
            folder = self._folders[queue] = str(self.directory / queue_key(queue))
        return folder

    def wake(self, queues: Iterable[str], signal: bytes = WAKE) -> None:
        for queue in set(queues):
            self.wake_one(queue, signal)

    def wake_one(self, queue: str, signal: bytes = WAKE) -> None:
        """Wake every waiter for ``queue`` (what a publish of one message does)."""
        try:
            entries = list(os.scandir(self._folder(queue)))
        except OSError:
            return  # nobody has ever waited for it
        for entry in entries:
            self._send(entry.path, signal)

    def _send(self, path: str, signal: bytes) -> None:
        with self._lock:  # no thread sends on a socket another one is renewing
            self._send_locked(path, signal)

    def _send_locked(self, path: str, signal: bytes) -> None:
        for fresh in (False, True):
            try:
                self._sock.sendto(signal, path)
                return
            except BlockingIOError:
                # Either the waiter has wake-ups it has not read (it is awake: enough), or
                # this socket's own send buffer is full of datagrams that busy waiters have
                # not read yet, which blocks it towards everyone. A fresh socket tells them
                # apart (those datagrams stay where they are and free the old one's buffer).
                if fresh:
                    return
                self._renew()
            except OSError as exc:
                if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
                    with contextlib.suppress(OSError):
                        os.unlink(path)  # its waiter is gone
                return

    def _renew(self) -> None:
        old, self._sock = self._sock, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        old.close()




class Listener:
    """One waiter's socket, listed under each of its queues."""

    def __init__(self, directory: Path, queues: Iterable[str], name: str) -> None:
        self.directory = directory
        (directory / "s").mkdir(parents=True, exist_ok=True)
        self.path = directory / "s" / name
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.setblocking(False)
        self.links: list[Path] = []
        #: Set when a wake-up said a broadcast waits (the reader resets it).
        self.broadcast = False
        for queue in queues:
            self.listen(queue)

    def listen(self, queue: str) -> None:
        folder = self.directory / queue_key(queue)
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / self.path.name
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(self.path)
        self.links.append(link)

    def fileno(self) -> int:
        return self.sock.fileno()

    def clear(self) -> bool:
        """Read every wake-up waiting; whether there was any (``broadcast`` is set if one
        said a broadcast waits)."""
        woken = False
        while True:
            try:
                signal = self.sock.recv(64)
            except OSError:
                return woken
            woken = True
            if signal == BROADCAST:
                self.broadcast = True

    def close(self) -> None:
        for link in self.links:
            with contextlib.suppress(OSError):
                link.unlink()
        with contextlib.suppress(OSError):
            self.path.unlink()
        self.sock.close()


class ListenerReadiness:
    """A link's ``input`` (see :class:`~taskq.broker.base.Readiness`) when a wake-up datagram
    is all that arrives: its drain() looks at the file itself, so nothing is half-read."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener

    def fileno(self) -> int:
        return self.listener.fileno()

    def buffered(self) -> bool:
        return False

    def waiting(self) -> bool:
        return False
