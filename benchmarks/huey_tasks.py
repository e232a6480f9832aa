"""The Huey side: ``huey.SqliteHuey`` with results in its own store, at taskq's durability.

Consumer: ``python -m huey.bin.huey_consumer benchmarks.huey_tasks.huey -w 2 -k process ...``
(the settings, and why, are in ``systems.py`` and the README) with ``$BENCH_HUEY_FILE`` set
to the file. The benchmark client calls :func:`make_huey` with the same file; both register
``add`` under one name (``benchmarks.huey_tasks.add``).

Durability: Huey leaves SQLite's ``synchronous`` at the library default (FULL here: every
commit waits for the disk) unless told ``fsync=False`` (OFF: an OS crash or power loss may
corrupt the file). taskq-embedded's default is NORMAL in WAL mode (survives any process
crash; a power loss may lose the last commits, not the file), so Huey gets NORMAL too
(:class:`NormalSqliteStorage`): both pay for the same promise per commit, and
``taskq-embedded-full`` shows what FULL costs.

Readiness: each worker process runs Huey's startup hooks before its first poll; the hook
here leaves a file named by its pid in :func:`ready_dir`, which the suite waits for.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

from huey import SqliteHuey
from huey.storage import SqliteStorage

FILE_ENV = "BENCH_HUEY_FILE"


def add(x: int, y: int) -> int:
    return x + y


class NormalSqliteStorage(SqliteStorage):
    """Huey's SQLite storage (WAL), committing at ``synchronous=NORMAL`` like taskq's."""

    def _create_connection(self) -> sqlite3.Connection:
        conn = super()._create_connection()
        conn.execute("pragma synchronous=NORMAL")
        return conn


def ready_dir(path: Path) -> Path:
    return Path(f"{path}-ready")


def make_storage(path: Path, queue: str) -> NormalSqliteStorage:
    """The storage alone (what the suite purges through)."""
    return NormalSqliteStorage(name=queue, filename=str(path))


def make_huey(path: str | Path, queue: str = "bench") -> tuple[SqliteHuey, Any]:
    huey = SqliteHuey(queue, filename=str(path), results=True,
                      storage_class=NormalSqliteStorage)  # fmt: skip
    task = huey.task()(add)

    @huey.on_startup("benchmark-ready")
    def announce() -> None:
        directory = ready_dir(Path(path))
        directory.mkdir(exist_ok=True)
        (directory / str(os.getpid())).touch()

    return huey, task


def __getattr__(name: str) -> Any:
    """``huey`` for the consumer, built on first use: importing this module for make_huey
    (the client) must not create a file from the environment's default."""
    if name != "huey":
        raise AttributeError(name)
    instance, _ = make_huey(os.environ[FILE_ENV])
    globals()["huey"] = instance
    return instance
