"""Which processes hold messages, and whether each is still alive, without any timeout.

A process that claims messages (a worker slot) or owns a reply queue (a client) registers as a
*holder*: a random id, and an exclusive ``fcntl`` lock on the byte at that offset of a file
beside the database. The kernel drops a process's locks the moment it dies, however it dies
(kill -9, the OOM killer, a segfault): another process that can take the lock knows the
holder is dead, and one that can't knows it is alive. So a dead holder's messages go back to
their queues as soon as anyone looks, and a live one's never do, however long its task runs.

POSIX record locks belong to a process, and closing *any* descriptor of the file drops them
all: each process opens the file once and keeps that descriptor (also across ``fork()``: a
child registers a holder of its own on the descriptor it inherited).
"""

from __future__ import annotations

import fcntl
import os
import secrets
import threading
from pathlib import Path

_lock = threading.Lock()
#: path -> descriptor, for this process (and inherited by children: never closed).
_files: dict[str, int] = {}
#: path -> (pid, holder id) of this process's holder.
_mine: dict[str, tuple[int, int]] = {}


def _descriptor(path: Path) -> int:
    key = str(path)
    fd = _files.get(key)
    if fd is None:
        fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o666)
        _files[key] = fd
    return fd


def my_holder(path: Path) -> tuple[int, bool]:
    """This process's holder id for the liveness file ``path``, and whether it is new (then
    the caller records it in the database)."""
    with _lock:
        found = _mine.get(str(path))
        if found is not None and found[0] == os.getpid():
            return found[1], False
        fd = _descriptor(path)
        while True:
            holder = secrets.randbits(62) + 1
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, holder)
            except OSError:
                continue  # taken (by a live process): draw again
            break
        _mine[str(path)] = (os.getpid(), holder)
        return holder, True


def is_alive(path: Path, holder: int) -> bool:
    """Whether the process that registered ``holder`` is alive (never asks about ourselves)."""
    mine = _mine.get(str(path))
    if mine is not None and mine == (os.getpid(), holder):
        return True
    with _lock:
        fd = _descriptor(path)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, holder)
        except OSError:
            return True
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, holder)
        return False


def _before_fork() -> None:
    _lock.acquire()


def _after_fork_in_parent() -> None:
    _lock.release()


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)
