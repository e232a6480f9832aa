"""Test helpers: the real broker (rabbitmqctl, raw AMQP), real worker processes, waiting.

Nothing here mocks taskq: workers are ``python -m taskq worker`` subprocesses, and facts about
queues come from the broker itself.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import amqp

ROOT = Path(__file__).resolve().parent.parent
RABBIT_HOST = os.environ.get("TASKQ_TEST_HOST", "127.0.0.1")
RABBIT_PORT = int(os.environ.get("TASKQ_TEST_PORT", "5672"))


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what`` at the end."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# -- the broker ----------------------------------------------------------------------------------


def rabbitmqctl(*args: str, check: bool = True, timeout: float = 60) -> str:
    proc = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {proc.stderr or proc.stdout}")
    return proc.stdout


@dataclass
class Letter:
    """A dead letter as a test sees it, whichever broker kept it."""

    body: bytes
    headers: dict[str, Any]
    exception: str
    reason: str
    original_queue: str
    correlation_id: str | None
    dead_at: str


class Broker:
    """What a test sees of the broker under test: facts about queues, from the broker itself.

    ``queue_info`` gives messages_ready / messages_unacknowledged / consumers (strings, as
    rabbitmqctl prints them); ``counts`` gives (ready, consumers); ``take_dead_letters``
    removes and returns a queue's dead letters; ``publish_raw`` sends what a foreign client
    would (any properties). Two kinds: :class:`RabbitBroker`, :class:`SqliteBroker`.
    """

    kind = ""
    url = ""

    def queue_info(self, queue: str) -> dict[str, str]:
        raise NotImplementedError

    def counts(self, queue: str) -> tuple[int, int]:
        raise NotImplementedError

    def exists(self, queue: str) -> bool:
        raise NotImplementedError

    def take_dead_letters(self, queue: str) -> list[Letter]:
        raise NotImplementedError

    def dead_letter_count(self, queue: str) -> int:
        raise NotImplementedError

    def publish_raw(self, queue: str, body: bytes, **properties: Any) -> None:
        raise NotImplementedError

    def publish_result(self, reply_queue: str, correlation_id: str, body: bytes) -> None:
        """A result message into a caller's reply queue, as any worker (or forger) sends it."""
        raise NotImplementedError

    def delete_queue(self, queue: str) -> None:
        raise NotImplementedError


class RabbitBroker(Broker):
    """The test session's view of RabbitMQ: one vhost, raw AMQP and rabbitmqctl access."""

    kind = "rabbitmq"

    def __init__(self, vhost: str) -> None:
        self.vhost = vhost
        self.url = f"amqp://guest:guest@{RABBIT_HOST}:{RABBIT_PORT}/{vhost}"

    def take_dead_letters(self, queue: str) -> list[Letter]:
        letters = []
        for message in self.get_all(f"{queue}.dlq") if self.exists(f"{queue}.dlq") else []:
            h = message.properties.get("application_headers") or {}
            letters.append(Letter(message.body, h, str(h.get("x-taskq-dead-exception")),
                                  str(h.get("x-taskq-dead-reason")),
                                  str(h.get("x-taskq-original-queue")),
                                  message.properties.get("correlation_id"),
                                  str(h.get("x-taskq-dead-at") or "")))
        return letters

    def dead_letter_count(self, queue: str) -> int:
        return self.counts(f"{queue}.dlq")[0] if self.exists(f"{queue}.dlq") else 0

    def publish_result(self, reply_queue: str, correlation_id: str, body: bytes) -> None:
        with self.channel() as ch:
            ch.basic_publish(amqp.Message(body, content_type="application/json",
                                          correlation_id=correlation_id),
                             exchange="", routing_key=reply_queue)

    def connect(self) -> amqp.Connection:
        conn = amqp.Connection(f"{RABBIT_HOST}:{RABBIT_PORT}", userid="guest", password="guest",
                               virtual_host=self.vhost)
        conn.connect()
        return conn

    @contextmanager
    def channel(self) -> Iterator[Any]:
        conn = self.connect()
        try:
            yield conn.channel()
        finally:
            conn.close()

    def queue_info(self, queue: str) -> dict[str, str]:
        """messages_ready / messages_unacknowledged / consumers / durable / arguments, by name."""
        fields = ["name", "messages_ready", "messages_unacknowledged", "consumers", "durable",
                  "arguments"]
        out = rabbitmqctl("list_queues", "-q", "--no-table-headers", "-p", self.vhost, *fields)
        for line in out.splitlines():
            parts = line.split("\t")
            if parts and parts[0] == queue:
                return dict(zip(fields, parts, strict=False))
        raise AssertionError(f"queue {queue!r} does not exist in vhost {self.vhost}")

    def queue_names(self) -> list[str]:
        out = rabbitmqctl("list_queues", "-q", "--no-table-headers", "-p", self.vhost, "name")
        return [line.strip() for line in out.splitlines() if line.strip()]

    def counts(self, queue: str) -> tuple[int, int]:
        """(ready, consumers) for a queue, via a passive declare (fast: no rabbitmqctl)."""
        with self.channel() as ch:
            _, ready, consumers = ch.queue_declare(queue, passive=True)
        return ready, consumers

    def exists(self, queue: str) -> bool:
        try:
            self.counts(queue)
        except amqp.exceptions.NotFound:
            return False
        return True

    def get_all(self, queue: str) -> list[amqp.Message]:
        """Take every message off a queue (acked), e.g. to inspect a dead-letter queue."""
        messages = []
        with self.channel() as ch:
            ch.auto_decode = False
            while True:
                message = ch.basic_get(queue, no_ack=True)
                if message is None:
                    return messages
                messages.append(message)

    def peek_all(self, queue: str) -> list[amqp.Message]:
        """Read every message of a queue without consuming it (they are requeued)."""
        with self.channel() as ch:
            ch.auto_decode = False
            messages = []
            while True:
                message = ch.basic_get(queue, no_ack=False)
                if message is None:
                    return messages
                messages.append(message)
            # closing the channel requeues them

    def publish_raw(self, queue: str, body: bytes, **properties: Any) -> None:
        """Publish as a foreign client would (declaring the queue, plainly, only if missing)."""
        if not self.exists(queue):
            with self.channel() as ch:
                ch.queue_declare(queue, durable=True, auto_delete=False)
        with self.channel() as ch:
            ch.basic_publish(amqp.Message(body, **properties), exchange="", routing_key=queue)

    def delete_queue(self, queue: str) -> None:
        with self.channel() as ch:
            ch.queue_delete(queue)

    def connections(self, name: str) -> list[str]:
        """Broker-side pids of this vhost's connections whose client name contains ``name``
        (taskq names them: "taskq worker slot-1 pid=...", "taskq results pid=...")."""
        out = rabbitmqctl("list_connections", "-q", "--no-table-headers", "pid", "vhost",
                          "client_properties")
        rows = [line.split("\t") for line in out.splitlines()]
        return [row[0] for row in rows if len(row) == 3 and row[1] == self.vhost
                and f'{{"connection_name","{name}' in row[2]]

    def close_connections(self, name: str) -> int:
        """Close (broker side) this vhost's connections named like ``name``; how many."""
        pids = self.connections(name)
        for pid in pids:
            rabbitmqctl("close_connection", pid, "closed by a taskq test", check=False)
        return len(pids)

    def restart(self) -> None:
        """Stop and start the RabbitMQ application (persistent data survives)."""
        rabbitmqctl("stop_app")
        rabbitmqctl("start_app")
        wait_for(self._reachable, 60, "RabbitMQ to accept connections again", interval=0.2)

    def _reachable(self) -> bool:
        try:
            self.connect().close()
        except Exception:
            return False
        return True


# -- workers ---------------------------------------------------------------------------------------


class SqliteBroker(Broker):
    """The test session's view of the embedded broker: its file, read with sqlite3."""

    kind = "sqlite"

    def __init__(self, path: Path) -> None:
        from taskq import App

        self.path = path
        self.url = f"sqlite:///{path}"
        App(self.url).broker.store.connection()  # creates the file and its schema
        from taskq.broker.sqlite.wake import queue_key, wake_dir

        self._wake_dir = wake_dir(path)
        self._queue_key = queue_key

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(str(self.path), timeout=30, isolation_level=None)

    def _scalar(self, sql: str, *params: Any) -> int:
        db = self._db()
        try:
            return int(db.execute(sql, params).fetchone()[0] or 0)
        finally:
            db.close()

    def consumers(self, queue: str) -> int:
        """Live listeners for the queue: a slot listens while it serves it."""
        folder = self._wake_dir / self._queue_key(queue)
        alive = 0
        for entry in folder.glob("*") if folder.is_dir() else []:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                probe.connect(str(entry))
                alive += 1
            except OSError:
                pass
            finally:
                probe.close()
        return alive

    def queue_info(self, queue: str) -> dict[str, str]:
        if not self.exists(queue):
            raise AssertionError(f"queue {queue!r} does not exist in {self.path}")
        ready = self._scalar("SELECT COUNT(*) FROM messages WHERE queue = ? AND holder IS NULL "
                             "AND due <= ?", queue, time.time())
        held = self._scalar("SELECT COUNT(*) FROM messages WHERE queue = ? AND holder IS NOT "
                            "NULL", queue)
        return {"name": queue, "messages_ready": str(ready),
                "messages_unacknowledged": str(held), "consumers": str(self.consumers(queue))}

    def counts(self, queue: str) -> tuple[int, int]:
        if queue.endswith(".dlq"):
            return self.dead_letter_count(queue[:-4]), 0
        if queue.startswith("taskq.reply."):
            return self._scalar("SELECT COUNT(*) FROM replies WHERE queue = ?", queue), 0
        if not self.exists(queue):
            return 0, self.consumers(queue)
        info = self.queue_info(queue)
        return int(info["messages_ready"]), int(info["consumers"])

    def exists(self, queue: str) -> bool:
        if queue.endswith(".dlq"):
            return self.exists(queue[:-4])
        if queue.startswith("taskq.reply."):
            return bool(self._scalar("SELECT COUNT(*) FROM reply_queues WHERE name = ?", queue))
        return bool(self._scalar("SELECT COUNT(*) FROM queues WHERE name = ?", queue))

    def delayed(self, queue: str) -> int:
        return self._scalar("SELECT COUNT(*) FROM messages WHERE queue = ? AND due > ?", queue,
                            time.time())

    def dead_letter_count(self, queue: str) -> int:
        return self._scalar("SELECT COUNT(*) FROM dead WHERE queue = ?", queue)

    def take_dead_letters(self, queue: str) -> list[Letter]:
        db = self._db()
        try:
            rows = db.execute("DELETE FROM dead WHERE queue = ? RETURNING body, props, exception, "
                              "reason, queue, id, dead_at", (queue,)).fetchall()
        finally:
            db.close()
        letters = []
        for body, props, exception, reason, original, _, dead_at in sorted(rows,
                                                                           key=lambda r: r[5]):
            props = json.loads(props)
            letters.append(Letter(body, props.get("headers") or {}, exception, reason, original,
                                  props.get("correlation_id"), dead_at))
        return letters

    def publish_raw(self, queue: str, body: bytes, **properties: Any) -> None:
        props = {"headers": properties.get("application_headers") or {},
                 "content_type": properties.get("content_type"),
                 "content_encoding": properties.get("content_encoding"),
                 "correlation_id": properties.get("correlation_id"),
                 "reply_to": properties.get("reply_to")}
        db = self._db()
        try:
            db.execute("INSERT OR IGNORE INTO queues (name, created) VALUES (?, ?)",
                       (queue, time.time()))
            db.execute("INSERT INTO messages (queue, due, body, props) VALUES (?, ?, ?, ?)",
                       (queue, time.time(), body, json.dumps(props)))
        finally:
            db.close()
        from taskq.broker.sqlite.wake import Waker

        Waker(self._wake_dir).wake([queue])

    def publish_result(self, reply_queue: str, correlation_id: str, body: bytes) -> None:
        props = json.dumps({"content_type": "application/json", "correlation_id": correlation_id})
        db = self._db()
        try:
            db.execute("INSERT INTO replies (queue, body, props) VALUES (?, ?, ?)",
                       (reply_queue, body, props))
        finally:
            db.close()
        from taskq.broker.sqlite.wake import Waker

        Waker(self._wake_dir).wake([reply_queue])

    def delete_queue(self, queue: str) -> None:
        db = self._db()
        try:
            db.execute("DELETE FROM messages WHERE queue = ?", (queue,))
            db.execute("DELETE FROM queues WHERE name = ?", (queue,))
            db.execute("DELETE FROM replies WHERE queue = ?", (queue,))
            db.execute("DELETE FROM reply_queues WHERE name = ?", (queue,))
        finally:
            db.close()


class ChildProcess:
    """A real ``taskq`` subprocess leading its own process group, its log in a file."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    _log: Any

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """kill -9 the whole process group (for a worker: supervisor, forkserver, slots)."""
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        """SIGTERM, then kill -9 if it has not exited within 20 s; its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        # the whole process group, in case a child outlived its leader
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()
        return self.proc.returncode


class WorkerProcess(ChildProcess):
    """A real ``taskq worker`` subprocess with its log captured to a file."""

    def __init__(self, broker: Broker, app: str, queues: list[str], log_path: Path,
                 *args: str, concurrency: int = 2, env: dict[str, str] | None = None,
                 cwd: Path = ROOT) -> None:
        self.broker = broker
        self.queues = queues
        self.concurrency = concurrency
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        environment = {**os.environ, "TASKQ_BROKER_URL": broker.url, "PYTHONUNBUFFERED": "1"}
        environment.pop("TASKQ_APP", None)
        environment.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "taskq", "worker", "-A", app, "-Q", ",".join(queues),
             "-c", str(concurrency), *args],
            cwd=cwd, env=environment, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 30) -> WorkerProcess:
        """Ready = the broker sees one consumer per slot on each queue."""
        def consuming() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return all(self.broker.counts(q)[1] >= self.concurrency for q in self.queues)
            except amqp.exceptions.NotFound:
                return False
        wait_for(consuming, timeout, f"worker on {self.queues} to consume")
        return self

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker did not exit within {timeout}s:\n{self.log()}") from None



def run_taskq(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
              cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run the ``taskq`` CLI and capture what it prints."""
    return subprocess.run([sys.executable, "-m", "taskq", *args], cwd=cwd,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def lines(path: Path) -> list[str]:
    """Lines a task appended to a file (its side effects), in order."""
    return path.read_text().split() if path.exists() else []
