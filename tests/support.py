"""Test helpers: the real broker (rabbitmqctl, raw AMQP), real worker processes, waiting.

Nothing here mocks taskq: workers are ``python -m taskq worker`` subprocesses, and facts about
queues come from the broker itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
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


class Broker:
    """The test session's view of RabbitMQ: one vhost, raw AMQP and rabbitmqctl access."""

    def __init__(self, vhost: str) -> None:
        self.vhost = vhost
        self.url = f"amqp://guest:guest@{RABBIT_HOST}:{RABBIT_PORT}/{vhost}"

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


class WorkerProcess:
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

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

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

    def kill(self) -> None:
        """kill -9 the whole worker: supervisor, forkserver and slot processes."""
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        # the whole process group, in case a child outlived its supervisor
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


def run_taskq(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
              cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run the ``taskq`` CLI and capture what it prints."""
    return subprocess.run([sys.executable, "-m", "taskq", *args], cwd=cwd,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def lines(path: Path) -> list[str]:
    """Lines a task appended to a file (its side effects), in order."""
    return path.read_text().split() if path.exists() else []
