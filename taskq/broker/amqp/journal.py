"""A worker's local journal on RabbitMQ: what it was running, and what it still owes the broker.

Two facts must outlive a worker killed with everything in it (kill -9 of the process group,
the OOM killer taking the whole container), because nobody else knows them:

* which messages its slots were running: those runs were cut short and must be counted
  (:mod:`taskq.broker.amqp.lost`), or a task that kills its worker every time would run
  forever;
* messages its slots settled while the broker refused publishes (a memory alarm): their
  results, dead letters and retries wait in a *spool* file until the broker takes them.

Each worker keeps them in a directory of its own under the state directory
(``$TASKQ_STATE_DIR``, else ``$XDG_STATE_HOME/taskq``, else ``~/.local/state/taskq``), per
broker::

    <state>/<broker>/<worker>/lock             held (shared) by the worker and its slots
    <state>/<broker>/<worker>/slot-<n>.run     what slot n runs (taskq.broker.records)
    <state>/<broker>/<worker>/slot-<n>.spool   what slot n owes the broker

A worker that starts looks at its siblings: one whose ``lock`` nobody holds belonged to a dead
worker; the new one records its lost runs, publishes its spools and deletes it, before its own
slots take any message. Files survive the death of processes, not of the machine's disk (and a
power loss may drop the last writes): after that, a lost run is not counted.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import pickle
import shutil
import socket
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ...message import Envelope

log = logging.getLogger("taskq.worker")

STATE_DIR_ENV = "TASKQ_STATE_DIR"
_LENGTH = struct.Struct("<I")


def state_dir() -> Path:
    explicit = os.environ.get(STATE_DIR_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                            "state")
    return Path(base) / "taskq"


def broker_key(urls: list[str]) -> str:
    """A directory name for one broker: readable host/vhost, no credentials."""
    parts = []
    for url in urls:
        try:
            split = urlsplit(url)
            parts.append(f"{split.hostname}:{split.port or 5672}{split.path or '/'}")
        except ValueError:
            parts.append(url.rsplit("@", 1)[-1])
    joined = ";".join(parts)
    digest = hashlib.sha256(joined.encode()).hexdigest()[:12]
    readable = "".join(c if c.isalnum() or c in "-." else "_" for c in parts[0])[:40]
    return f"{readable}-{digest}"


# -- the spool ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Owed:
    """A message a slot owes the broker: a caller's result, or a message to store."""

    kind: str  # "result" (to a reply queue, unconfirmed) or "store" (confirmed, mandatory)
    envelope: Envelope


class Spool:
    """Messages kept in a local file until the broker takes them (append, then drop all)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._count: int | None = None

    def append(self, owed: Owed) -> None:
        record = pickle.dumps(
            (owed.kind, owed.envelope.queue, owed.envelope.body, owed.envelope.content_type,
             owed.envelope.headers, owed.envelope.correlation_id, owed.envelope.reply_to,
             owed.envelope.delay, owed.envelope.content_encoding),
            protocol=pickle.HIGHEST_PROTOCOL,
        )
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, _LENGTH.pack(len(record)) + record)
        finally:
            os.close(fd)
        if self._count is not None:
            self._count += 1

    def __iter__(self) -> Iterator[Owed]:
        try:
            data = Path(self.path).read_bytes()
        except FileNotFoundError:
            return
        offset = 0
        while offset + _LENGTH.size <= len(data):
            (size,) = _LENGTH.unpack_from(data, offset)
            offset += _LENGTH.size
            if offset + size > len(data):
                break  # a write cut short by a kill: it was never settled against
            kind, queue, body, ctype, headers, cid, reply_to, delay, encoding = pickle.loads(
                data[offset : offset + size]
            )
            offset += size
            yield Owed(kind, Envelope(queue, body, ctype, headers, cid, reply_to, delay, encoding))

    def __len__(self) -> int:
        if self._count is None:
            self._count = sum(1 for _ in self)
        return self._count

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._count = 0


# -- a worker's directory ------------------------------------------------------------------------


class WorkerJournal:
    """This worker's directory, created under a temporary name and renamed once locked, so a
    sibling never sees it unlocked."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging = root / f".new-{name}"
        staging.mkdir(mode=0o700)
        self._lock = open(staging / "lock", "wb")  # noqa: SIM115 - held for our lifetime
        fcntl.flock(self._lock, fcntl.LOCK_SH)
        self.path = root / name
        staging.rename(self.path)

    def run_record_path(self, index: int) -> str:
        return str(self.path / f"slot-{index}.run")

    def spool_path(self, index: int) -> str:
        return str(self.path / f"slot-{index}.spool")

    def lock_path(self) -> str:
        return str(self.path / "lock")

    def dead_siblings(self) -> Iterator[Path]:
        """Directories of workers for this broker that died (each locked for us meanwhile:
        two workers starting at once don't recover the same one)."""
        for entry in sorted(self.root.iterdir()):
            if entry == self.path or entry.name.startswith(".") or not entry.is_dir():
                continue
            try:
                lock = open(entry / "lock", "rb")  # noqa: SIM115 - closed below
            except OSError:
                continue
            with lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # alive (or being recovered by another worker)
                yield entry

    def close(self, *, keep: bool = False) -> None:
        """At a clean exit: nothing is owed (``keep``: something is, leave it to the next)."""
        if not keep:
            shutil.rmtree(self.path, ignore_errors=True)
        self._lock.close()


def hold_lock(path: str) -> Any:
    """A slot process's share of its worker's lock (kept open for the process's lifetime)."""
    handle = open(path, "rb")  # noqa: SIM115
    fcntl.flock(handle, fcntl.LOCK_SH)
    return handle
