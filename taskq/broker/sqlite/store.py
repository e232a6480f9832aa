"""The embedded broker's file: where it is, whether it can be used, its schema, transactions.

One SQLite file in WAL mode holds everything: task messages (with who holds each), results
waiting for their callers, dead letters, and the processes that hold messages. Every change
is one short transaction (``BEGIN IMMEDIATE``); a busy file is waited for, within the
operation's own bound, so "database is locked" never reaches a user (after the bound it is
:class:`~taskq.BrokerUnavailable`, saying which file).

Durability (``synchronous``): ``normal`` by default, which in WAL mode survives the kill -9 of
any process and keeps the file consistent on an OS crash or power loss, where the last
transactions may be lost; ``sqlite:///taskq.db?synchronous=full`` survives those too (every
commit waits for the disk: here about 5x the cost of a commit, see the README's Performance).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from ...errors import BrokerUnavailable, ConfigurationError

T = TypeVar("T")

log = logging.getLogger("taskq.broker")

SCHEMA_VERSION = 4
#: A commit that finds this many pages in the write-ahead log copies them into the file
#: itself (a checkpoint, with an fsync at ``normal``) before it returns. A running worker
#: checkpoints in the background every :data:`CHECKPOINT_EVERY` seconds, so with a worker up
#: no sender or slot pays for it; without one, a sender does, every 16 MiB of commits.
AUTOCHECKPOINT_PAGES = 4000
CHECKPOINT_EVERY = 0.2
#: Pages of a new file (bytes). A commit writes every page it changed to the log: a settle
#: changes five or six (a result, a message, their indexes), and 1 KiB pages make it ~35%
#: cheaper than SQLite's 4 KiB default; a message body of more than ~1 KiB spills over
#: into more pages, at about the same cost per byte.
PAGE_SIZE = 1024
#: The log's file is cut back to this size when it restarts after a checkpoint.
JOURNAL_SIZE_LIMIT = 16 * 1024 * 1024
FORMAT = "taskq"
SYNCHRONOUS = ("normal", "full")

#: Filesystems on which SQLite's locking (and WAL's shared memory) can't be trusted.
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb", "smb3", "smbfs", "9p", "ceph", "glusterfs", "lustre", "afs",
    "gpfs", "beegfs", "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.rclone", "davfs",
    "fuse.glusterfs", "fuse.cephfs", "ncpfs", "coda",
})

#: Celery's monitoring protocols (events, remote control) and revocations (schema 4).
CONTROL_TABLES = """
CREATE TABLE events (id INTEGER PRIMARY KEY, at REAL NOT NULL, body TEXT NOT NULL);
CREATE TABLE commands (id INTEGER PRIMARY KEY, at REAL NOT NULL, body TEXT NOT NULL);
CREATE TABLE command_replies (id INTEGER PRIMARY KEY, ticket TEXT NOT NULL, at REAL NOT NULL,
                              body TEXT NOT NULL);
CREATE INDEX command_replies_ticket ON command_replies (ticket);
CREATE TABLE revoked (task_id TEXT PRIMARY KEY, until REAL NOT NULL);
"""

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE queues (name TEXT PRIMARY KEY, created REAL NOT NULL, max_priority INTEGER);
CREATE TABLE messages (
    id INTEGER PRIMARY KEY,
    queue TEXT NOT NULL,
    due REAL NOT NULL,
    body BLOB NOT NULL,
    props TEXT NOT NULL,
    holder INTEGER,
    deliveries INTEGER NOT NULL DEFAULT 0,
    lost INTEGER NOT NULL DEFAULT 0,
    priority INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX messages_ready ON messages (queue, due, id) WHERE holder IS NULL;
CREATE INDEX messages_ranked ON messages (queue, priority DESC, due, id)
    WHERE holder IS NULL AND priority > 0;
CREATE INDEX messages_held ON messages (holder) WHERE holder IS NOT NULL;
CREATE TABLE replies (id INTEGER PRIMARY KEY, queue TEXT NOT NULL, body BLOB NOT NULL,
                      props TEXT NOT NULL);
CREATE INDEX replies_queue ON replies (queue);
CREATE TABLE reply_queues (name TEXT PRIMARY KEY, holder INTEGER NOT NULL);
CREATE TABLE dead (
    id INTEGER PRIMARY KEY,
    queue TEXT NOT NULL,
    body BLOB NOT NULL,
    props TEXT NOT NULL,
    exception TEXT NOT NULL,
    reason TEXT NOT NULL,
    dead_at TEXT NOT NULL,
    worker TEXT NOT NULL
);
CREATE INDEX dead_queue ON dead (queue, id);
CREATE TABLE holders (id INTEGER PRIMARY KEY, pid INTEGER NOT NULL, host TEXT NOT NULL,
                      started REAL NOT NULL);
CREATE TABLE rates (key TEXT PRIMARY KEY, last REAL NOT NULL);
CREATE TABLE bindings (queue TEXT NOT NULL, pattern TEXT NOT NULL, PRIMARY KEY (queue, pattern));
CREATE TABLE members (queue TEXT NOT NULL, member TEXT NOT NULL, holder INTEGER NOT NULL,
                      PRIMARY KEY (queue, member));
CREATE TABLE chord_parts (chord TEXT NOT NULL, idx INTEGER NOT NULL, body BLOB NOT NULL,
                          created REAL NOT NULL, PRIMARY KEY (chord, idx));
CREATE TABLE sent (task_id TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE beat (schedule TEXT NOT NULL, entry TEXT NOT NULL, last_due REAL NOT NULL,
                   PRIMARY KEY (schedule, entry));
""" + CONTROL_TABLES


#: How a file of an older schema becomes the next one; applied in turn up to the current
#: schema (in one transaction, on first open).
MIGRATIONS = {
    # 1 → 2: priority queues, rate limits, topic bindings, broadcast members.
    "1": """
ALTER TABLE queues ADD COLUMN max_priority INTEGER;
ALTER TABLE messages ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
CREATE INDEX messages_ranked ON messages (queue, priority DESC, due, id)
    WHERE holder IS NULL AND priority > 0;
CREATE TABLE rates (key TEXT PRIMARY KEY, last REAL NOT NULL);
CREATE TABLE bindings (queue TEXT NOT NULL, pattern TEXT NOT NULL, PRIMARY KEY (queue, pattern));
CREATE TABLE members (queue TEXT NOT NULL, member TEXT NOT NULL, holder INTEGER NOT NULL,
                      PRIMARY KEY (queue, member));
""",
    # 2 → 3: chord joins, workflow messages sent (each once), the beat's schedule state.
    "2": """
CREATE TABLE chord_parts (chord TEXT NOT NULL, idx INTEGER NOT NULL, body BLOB NOT NULL,
                          created REAL NOT NULL, PRIMARY KEY (chord, idx));
CREATE TABLE sent (task_id TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE beat (schedule TEXT NOT NULL, entry TEXT NOT NULL, last_due REAL NOT NULL,
                   PRIMARY KEY (schedule, entry));
""",
    # 3 → 4: Celery's monitoring protocols (events, remote control), revocations.
    "3": CONTROL_TABLES,
}


def parse_url(url: str) -> tuple[Path, str]:
    """(absolute path, synchronous) from ``sqlite:///relative.db`` or ``sqlite:////abs.db``."""
    split = urlsplit(url)
    if split.netloc:
        raise ConfigurationError(
            f"broker URL {url} names a host ({split.netloc!r}): the embedded broker is a file "
            "on this machine; use sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    raw = split.path[1:] if split.path.startswith("/") else split.path
    if not raw or raw == ":memory:":
        raise ConfigurationError(
            f"broker URL {url} names no file: use sqlite:///taskq.db (relative to the working "
            "directory) or sqlite:////absolute/path/taskq.db (several processes share it)"
        )
    options = {k: v[-1] for k, v in parse_qs(split.query).items()}
    unknown = sorted(set(options) - {"synchronous"})
    if unknown:
        raise ConfigurationError(
            f"broker URL {url}: unknown option(s) {', '.join(unknown)} (known: synchronous)"
        )
    synchronous = options.get("synchronous", "normal").lower()
    if synchronous not in SYNCHRONOUS:
        raise ConfigurationError(
            f"broker URL {url}: synchronous must be one of {', '.join(SYNCHRONOUS)}"
        )
    # Symlinks resolved: every process must name the file (and so the liveness file and the
    # wake-up folder beside it) the same way, or one would take the others for dead.
    return Path(os.path.realpath(os.path.expanduser(raw))), synchronous


def filesystem_type(path: Path, mountinfo: str) -> str:
    """The type of the filesystem holding ``path``, read from ``/proc/self/mountinfo``."""
    best, kind = "", ""
    target = str(path)
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        mount_point = fields[4].replace("\\040", " ")
        after = line.split(" - ", 1)[1].split()
        if not after:
            continue
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) > len(best):
            best, kind = mount_point, after[0]
    return kind


def check_location(path: Path) -> None:
    """Refuse, in one line each, a file taskq can't use: nowhere to write it, a network disk."""
    directory = path.parent
    if not directory.is_dir():
        raise ConfigurationError(
            f"cannot use {path} for the embedded broker: the directory {directory} does not "
            "exist (create it, or point TASKQ_BROKER_URL at another file)"
        )
    if path.is_dir():
        raise ConfigurationError(f"cannot use {path} for the embedded broker: it is a directory")
    writable = os.access(path if path.exists() else directory, os.W_OK)
    if writable and not path.exists():
        try:  # access() trusts permissions; a read-only mount says no only when tried
            probe = directory / f".taskq-probe-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError:
            writable = False
    if not writable:
        raise ConfigurationError(
            f"cannot use {path} for the embedded broker: "
            f"{'it' if path.exists() else directory} is not writable by this user"
        )
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return  # not Linux: nothing to read it from
    kind = filesystem_type(path.resolve(), mountinfo)
    if kind in NETWORK_FILESYSTEMS or kind.startswith("nfs"):
        raise ConfigurationError(
            f"cannot use {path} for the embedded broker: it is on a network filesystem "
            f"({kind}), where SQLite's locks don't hold; put it on a local disk, or use "
            "RabbitMQ (amqp://...) for several machines"
        )


def is_busy(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


class Store:
    """The file, and one SQLite connection per thread of this process.

    ``fork()``: SQLite keeps the locks and shared memory of every file a process has open in
    process-wide bookkeeping, which a child inherits, including locks held at that instant
    by other threads (which the child does not have): the child would find the file locked
    forever, even on new connections, or worse. So at a fork every Store waits for its
    transactions in flight (``_gate``), closes all its connections, and lets the fork go on
    with SQLite holding nothing; parent and child reopen theirs when next needed.
    """

    def __init__(self, path: Path, synchronous: str, *, timeout: float) -> None:
        self.path = path
        self.synchronous = synchronous
        self.timeout = timeout
        self._local = threading.local()
        self._pid = os.getpid()
        self._checked = False
        self._gate = threading.RLock()
        self._conns: list[sqlite3.Connection] = []
        self._generation = 0
        _STORES.add(self)

    # -- opening -------------------------------------------------------------------------------

    def connection(self) -> sqlite3.Connection:
        if self._pid != os.getpid():
            self.after_fork()
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "generation", -1) != self._generation:
            if not self._checked:
                check_location(self.path)
            conn = self._open()
            with self._gate:
                self._conns.append(conn)
            self._local.conn, self._local.generation = conn, self._generation
        return conn

    def _open(self) -> sqlite3.Connection:
        # Never open() the file to look at it: closing any descriptor of a file drops every
        # POSIX lock this process holds on it, SQLite's own included (its docs' first way to
        # corrupt a database). SQLite says itself whether the file is a database.
        conn = sqlite3.connect(
            str(self.path), timeout=self.timeout, isolation_level=None, check_same_thread=False
        )
        try:
            try:
                conn.execute("PRAGMA schema_version")
            except sqlite3.DatabaseError as exc:
                raise ConfigurationError(
                    f"{self.path} is not an SQLite database ({exc}), so not a taskq broker "
                    "file: point TASKQ_BROKER_URL at another file"
                ) from None
            conn.execute(f"PRAGMA page_size={PAGE_SIZE}")  # a new file's only: before WAL
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
            conn.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")
            conn.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
            self._check_schema(conn)
        except BaseException:
            conn.close()
            raise
        self._checked = True
        return conn

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        deadline = time.monotonic() + self.timeout
        with self._transaction(conn, deadline):
            tables = {row[0] for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type='table'")}
            if not tables:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT INTO meta VALUES ('format', ?), ('schema', ?)",
                             (FORMAT, str(SCHEMA_VERSION)))
                return
            meta: dict[str, str] = {}
            if "meta" in tables:
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            schema = meta.get("schema", "") if meta.get("format") == FORMAT else None
            if schema in MIGRATIONS:  # an older taskq's file: brought up to date, in place
                while schema in MIGRATIONS:
                    for statement in MIGRATIONS[schema].split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    schema = str(int(schema) + 1)
                conn.execute("UPDATE meta SET value = ? WHERE key = 'schema'",
                             (str(SCHEMA_VERSION),))
                log.info("%s: schema %s brought up to schema %d", self.path,
                         meta.get("schema"), SCHEMA_VERSION)
                return
        if meta.get("format") != FORMAT:
            raise ConfigurationError(
                f"{self.path} is an SQLite database that is not taskq's (it has other tables): "
                "point TASKQ_BROKER_URL at another file"
            )
        if meta.get("schema") != str(SCHEMA_VERSION):
            raise ConfigurationError(
                f"{self.path} was made by another version of taskq (schema "
                f"{meta.get('schema')}; this one reads schema {SCHEMA_VERSION}): use the taskq "
                "that made it, or another file"
            )

    # -- transactions ----------------------------------------------------------------------------

    def _busy_waited(self, conn: sqlite3.Connection, deadline: float, run: Callable[[], T]) -> T:
        """``run()`` (one statement), waiting for a busy file until ``deadline``: SQLite's
        own wait (its busy timeout, cut to what is left of the deadline), then again."""
        delay = 0.001
        while True:
            remaining = deadline - time.monotonic()
            short = remaining < self.timeout - 1.0  # shorter than the connection's (timeout=)
            if short:
                conn.execute(f"PRAGMA busy_timeout={max(1, int(remaining * 1000))}")
            try:
                return run()
            except sqlite3.OperationalError as exc:
                if not is_busy(exc) or time.monotonic() >= deadline:
                    raise self._unavailable(exc) from exc
            finally:
                if short:
                    conn.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    @contextlib.contextmanager
    def _transaction(self, conn: sqlite3.Connection, deadline: float) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, waiting for a busy file until ``deadline`` (only the
        BEGIN waits: in WAL mode the transaction then holds the only write lock)."""
        self._busy_waited(conn, deadline, lambda: conn.execute("BEGIN IMMEDIATE"))
        try:
            yield
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise self._unavailable(exc) from exc

    @contextlib.contextmanager
    def write(self, deadline: float | None = None) -> Iterator[sqlite3.Connection]:
        """A write transaction (on this thread's connection), bounded by ``deadline``."""
        with self._gate:
            conn = self.connection()
            with self._transaction(conn, deadline or time.monotonic() + self.timeout):
                yield conn

    def write_one(self, sql: str, params: Any, deadline: float) -> int:
        """One statement, its own transaction (SQLite's autocommit: atomic, and a busy file
        is waited for as in :meth:`write`); cheaper than BEGIN ... COMMIT around it. Returns
        the row id it inserted, if any."""
        with self._gate:
            conn = self.connection()
            return self._busy_waited(
                conn, deadline, lambda: conn.execute(sql, params).lastrowid or 0)

    def read(self, sql: str, params: Any = ()) -> list[Any]:
        with self._gate:
            conn = self.connection()
            return self._busy_waited(conn, time.monotonic() + self.timeout,
                                     lambda: conn.execute(sql, params).fetchall())

    def checkpoint(self) -> None:
        """Copy what the log holds into the file, as far as no reader needs it (PASSIVE:
        never waits for, nor blocks, anyone)."""
        self.read("PRAGMA wal_checkpoint(PASSIVE)")

    def _unavailable(self, exc: BaseException) -> BaseException:
        if is_busy(exc):
            return BrokerUnavailable(
                f"the embedded broker's file {self.path} stayed locked by another process for "
                f"{self.timeout:g}s ({exc}); is a process holding a transaction open on it?"
            )
        if isinstance(exc, sqlite3.DatabaseError) and "malformed" in str(exc).lower():
            return BrokerUnavailable(f"{self.path} is damaged ({exc})")
        return exc

    # -- forking -----------------------------------------------------------------------------

    def before_fork(self) -> None:
        self._gate.acquire()  # no transaction or read in flight from here on
        for conn in self._conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._conns = []
        self._generation += 1

    def after_fork_in_parent(self) -> None:
        self._gate.release()

    def after_fork(self) -> None:
        """In a child (connections were closed before the fork): fresh state."""
        self._gate = threading.RLock()
        self._conns = []
        self._local = threading.local()
        self._generation += 1
        self._pid = os.getpid()

    def close(self) -> None:
        with self._gate:
            for conn in self._conns:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._conns = []
            self._generation += 1


_STORES: weakref.WeakSet[Store] = weakref.WeakSet()


def _before_fork() -> None:
    for store in list(_STORES):
        store.before_fork()


def _after_fork_in_parent() -> None:
    for store in list(_STORES):
        store.after_fork_in_parent()


def _after_fork_in_child() -> None:
    for store in list(_STORES):
        if store._pid != os.getpid():
            store.after_fork()


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)


def encode_props(props: dict[str, Any]) -> str:
    return json.dumps(props, separators=(",", ":"), default=str)


def decode_props(text: str) -> dict[str, Any]:
    value = json.loads(text)
    return value if isinstance(value, dict) else {}
