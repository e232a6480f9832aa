"""The shared RabbitMQ: one vhost per system per run, and facts about queues from the broker.

A :class:`Vhost` is one kind of *place* (see ``places.py``): where a system's messages live
for the run. The embedded systems' places are files (``embedded.py``).
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import amqp

if TYPE_CHECKING:
    from .places import Worker

HOST = "127.0.0.1"
PORT = 5672
USER = "guest"
PASSWORD = "guest"


def rabbitmqctl(*args: str, patience: float = 90) -> str:
    """Run rabbitmqctl; while it fails (the broker restarting?), retry for ``patience`` s."""
    deadline = time.monotonic() + patience
    while True:
        proc = subprocess.run(
            ["rabbitmqctl", *args], capture_output=True, text=True, timeout=60, check=False
        )
        if proc.returncode == 0:
            return proc.stdout
        if time.monotonic() > deadline:
            error = (proc.stderr or proc.stdout).strip().splitlines()[:1]
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {' '.join(error)}")
        time.sleep(1)


def connect(url: str) -> amqp.Connection:
    """A raw py-amqp connection to an ``amqp://user:pass@host:port/vhost`` URL."""
    parts = urlsplit(url)
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    conn = amqp.Connection(
        f"{parts.hostname}:{parts.port or PORT}",
        userid=unquote(parts.username or USER),
        password=unquote(parts.password or PASSWORD),
        virtual_host=vhost,
        heartbeat=0,
    )
    conn.connect()
    return conn


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` (every 10 ms) until truthy; raise naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.01)


@dataclass
class Vhost:
    """One system's vhost: created for the run, deleted at the end."""

    name: str
    created: bool = False
    _admin: amqp.Connection | None = field(default=None, repr=False)
    #: RabbitMQ is needed, and its node's CPU is part of what a task costs.
    needs_rabbitmq = True

    @property
    def url(self) -> str:
        return f"amqp://{USER}:{PASSWORD}@{HOST}:{PORT}/{self.name}"

    def create(self) -> Vhost:
        rabbitmqctl("add_vhost", self.name)
        self.created = True
        rabbitmqctl("set_permissions", "-p", self.name, USER, ".*", ".*", ".*")
        return self

    def delete(self) -> None:
        self.close_admin()
        if not self.created:
            return
        try:
            rabbitmqctl("delete_vhost", self.name)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"warning: could not delete vhost {self.name}: {exc}")
        self.created = False

    # -- queue facts, over one admin connection ----------------------------------------------

    def _channel(self) -> Any:
        if self._admin is None:
            self._admin = connect(self.url)
        return self._admin.channel()

    def close_admin(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            with contextlib.suppress(Exception):
                admin.close()

    def connection_lost(self) -> bool:
        """True if the admin connection broke: the broker restarted (or stopped) since."""
        if self._admin is None:
            return False
        try:
            self._channel().close()
        except Exception:
            self.close_admin()
            return True
        return False

    def wait_reachable(self, timeout: float = 120) -> None:
        def reachable() -> bool:
            try:
                self._channel().close()
            except Exception:
                self.close_admin()
                return False
            return True

        wait_for(reachable, timeout, f"the broker to accept connections to {self.name}")

    def counts(self, queue: str) -> tuple[int, int] | None:
        """(messages ready, consumers) of ``queue``, or None if it does not exist."""
        channel = self._channel()
        try:
            _, ready, consumers = channel.queue_declare(queue, passive=True)
        except amqp.exceptions.NotFound:
            return None  # the broker closed that channel; the connection lives on
        channel.close()
        return ready, consumers

    def consumers(self, queue: str) -> int:
        counts = self.counts(queue)
        return counts[1] if counts else 0

    def purge(self, queue: str) -> None:
        channel = self._channel()
        try:
            channel.queue_purge(queue)
        except amqp.exceptions.NotFound:
            return
        channel.close()

    def wait_consumers(
        self, queue: str, at_least: int, timeout: float, alive: Callable[[], None]
    ) -> None:
        """Wait for ``at_least`` consumers on ``queue``; ``alive()`` raises if the worker died."""

        def ready() -> bool:
            alive()
            return self.consumers(queue) >= at_least

        wait_for(ready, timeout, f"{at_least} consumer(s) on {self.name}/{queue}")

    def wait_no_consumers(self, queue: str, timeout: float = 30) -> None:
        wait_for(lambda: self.consumers(queue) == 0, timeout, f"no consumers on {queue}")

    # -- the place surface (places.Place) ----------------------------------------------------

    def wait_ready(self, queue: str, slots: int, worker: Worker, timeout: float) -> None:
        """Up when the broker shows the worker's consumers on the queue."""
        self.wait_consumers(queue, slots, timeout, worker.check_alive)

    def wait_stopped(self, queue: str) -> None:
        """A stopped worker's connections may close a moment after it exits."""
        self.wait_no_consumers(queue)

    def describe(self) -> str:
        return f"RabbitMQ vhost {self.name}"

    def server_version(self) -> str:
        self._channel().close()
        assert self._admin is not None
        props = self._admin.server_properties
        version = props.get("version", "?")
        return version.decode() if isinstance(version, bytes) else str(version)
