"""The places of the embedded systems: a fresh temporary directory holding one SQLite file.

taskq's embedded broker (``sqlite:////tmp/taskq-bench-*/bench.db``) and Huey's SQLite
storage each get a directory of their own per run, deleted at the end (also after errors or
Ctrl-C). There is no broker process: the client and the worker processes do the broker's
work themselves, so their CPU per task already includes it.

The directory is under ``$TMPDIR`` (default ``/tmp``). It must be a local disk: taskq refuses
network filesystems, and on a tmpfs ``synchronous=full`` would cost nothing (no disk to wait
for), which would hide the very cost the ``-full`` system is there to show.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .broker import wait_for
from .places import Worker
from .procs import tree

FILENAME = "bench.db"


def filesystem(directory: Path) -> str:
    """The type of the filesystem ``directory`` is on (util-linux's findmnt), for the report."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        proc = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--target", str(directory)],
                              capture_output=True, text=True, timeout=10, check=True)  # fmt: skip
        return proc.stdout.strip() or "?"
    return "?"


class EmbeddedDir:
    """A temporary directory with the system's SQLite file in it; nothing to connect to."""

    needs_rabbitmq = False

    def __init__(self, name: str) -> None:
        self.name = name
        self.directory: Path | None = None

    @property
    def path(self) -> Path:
        assert self.directory is not None, "create() first"
        return self.directory / FILENAME

    def create(self) -> EmbeddedDir:
        self.directory = Path(tempfile.mkdtemp(prefix="taskq-bench-"))
        return self

    def delete(self) -> None:
        self.close()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def close(self) -> None:
        """Close this process's own connections to the file (subclasses)."""

    def describe(self) -> str:
        return f"{self.path} ({filesystem(self.path.parent)})"

    # -- nothing can restart under a phase -----------------------------------------------------

    def connection_lost(self) -> bool:
        return False

    def wait_reachable(self) -> None:
        pass

    def wait_stopped(self, queue: str) -> None:
        """Nothing to wait for: the worker's process group is gone when stop() returns."""

    def _wait_pids(self, pids: Callable[[], list[int]], slots: int, worker: Worker,
                   timeout: float, what: str) -> None:  # fmt: skip
        """Until ``slots`` of the pids ``pids()`` lists are processes of the worker's tree."""

        def ready() -> bool:
            worker.check_alive()
            return len(set(pids()) & set(tree(worker.pid))) >= slots

        wait_for(ready, timeout, f"{slots} {what} of {self.name}")


class TaskqFile(EmbeddedDir):
    """taskq's embedded broker file, at ``synchronous=normal`` (its default) or ``full``.

    The purge and the readiness check read taskq's file directly (schema 1: tables
    ``messages`` and ``holders``), as the vhost does with RabbitMQ: taskq has no purge
    command, and a slot process registers itself as a holder when it opens its link.
    """

    def __init__(self, name: str, synchronous: str = "normal") -> None:
        super().__init__(name)
        self.synchronous = synchronous
        self._db: sqlite3.Connection | None = None

    @property
    def url(self) -> str:
        query = "" if self.synchronous == "normal" else f"?synchronous={self.synchronous}"
        return f"sqlite:///{self.path}{query}"  # an absolute path: sqlite:////tmp/...

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            # Autocommit: each statement is its own transaction, waiting up to 15 s for the
            # file's write lock (taskq's own publish_timeout).
            self._db = sqlite3.connect(self.path, timeout=15, isolation_level=None)
        return self._db

    def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()

    def purge(self, queue: str) -> None:
        self._conn().execute("DELETE FROM messages WHERE queue = ?", (queue,))

    def slot_pids(self) -> list[int]:
        try:
            return [pid for (pid,) in self._conn().execute("SELECT pid FROM holders")]
        except sqlite3.OperationalError:  # no schema yet
            return []

    def wait_ready(self, queue: str, slots: int, worker: Worker, timeout: float) -> None:
        """Up when ``slots`` processes of the worker's tree are registered holders."""
        self._wait_pids(self.slot_pids, slots, worker, timeout, "registered slot(s)")

    def describe(self) -> str:
        return f"{super().describe()}, synchronous={self.synchronous}"


class HueyFile(EmbeddedDir):
    """Huey's SqliteHuey file. Purged through Huey's own API; a worker process is up when
    it has run the benchmark's startup hook (it leaves a file named by its pid)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._storages: dict[str, Any] = {}

    @property
    def url(self) -> str:
        return str(self.path)

    @property
    def ready_dir(self) -> Path:
        from .huey_tasks import ready_dir

        return ready_dir(self.path)

    def purge(self, queue: str) -> None:
        from .huey_tasks import make_storage

        if queue not in self._storages:
            self._storages[queue] = make_storage(self.path, queue)
        self._storages[queue].flush_queue()

    def close(self) -> None:
        for storage in self._storages.values():
            storage.close()
        self._storages = {}

    def ready_pids(self) -> list[int]:
        with contextlib.suppress(OSError):
            return [int(p.name) for p in self.ready_dir.iterdir() if p.name.isdigit()]
        return []

    def wait_ready(self, queue: str, slots: int, worker: Worker, timeout: float) -> None:
        self._wait_pids(self.ready_pids, slots, worker, timeout, "started Huey worker(s)")
