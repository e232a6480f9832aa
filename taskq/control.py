"""Steering workers from anywhere: remote-control commands, revocations, the event stream.

``app.control`` (a :class:`Control`) speaks Celery's remote-control protocol over the app's
broker, so the same commands reach taskq workers and Celery workers alike::

    app.control.ping()                     # {"taskq-4121@web1": {"ok": "pong"}, ...}
    app.control.inspect("active")          # {node: [task, ...]}
    app.control.revoke(task_id, terminate=True)

``taskq inspect``, ``taskq status``, ``taskq events`` and ``taskq revoke`` are built on it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .broker.base import ControlLink

if TYPE_CHECKING:
    from .broker.base import Broker
    from .config import Config

#: How long a command waits for replies by default (seconds).
DEFAULT_TIMEOUT = 1.0


class Control:
    def __init__(self, broker: Broker, config: Config) -> None:
        self.broker = broker
        self.config = config

    def link(self) -> ControlLink:
        """A link of its own (close it): for a caller that sends many commands."""
        return self.broker.reach(
            lambda: self.broker.control_link(timeout=self.config.connect_timeout))

    def broadcast(
        self,
        method: str,
        arguments: dict[str, Any] | None = None,
        *,
        destination: Sequence[str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        limit: int | None = None,
        reply: bool = True,
        link: ControlLink | None = None,
    ) -> dict[str, Any]:
        """Send ``method`` to every worker (or to the ``destination`` nodes) and collect the
        replies for ``timeout`` seconds, or until ``limit`` (default: as many as
        ``destination`` names) have answered: ``{node: value}``."""
        own = link is None
        link = link or self.link()
        try:
            ticket = link.call(method, arguments or {}, destination=destination, reply=reply,
                               timeout=timeout)
            if not reply:
                return {}
            try:
                return self._collect(link, ticket, timeout,
                                     limit if limit is not None
                                     else (len(destination) if destination else None))
            finally:
                link.forget(ticket)
        finally:
            if own:
                link.close()

    @staticmethod
    def _collect(link: ControlLink, ticket: str, timeout: float, wanted: int | None
                 ) -> dict[str, Any]:
        found: dict[str, Any] = {}
        deadline = time.monotonic() + timeout
        while True:
            for answer in link.replies(ticket):
                found.update(answer)
            left = deadline - time.monotonic()
            if left <= 0 or (wanted is not None and len(found) >= wanted):
                return found
            link.wait(min(left, 0.25))

    def ping(self, **options: Any) -> dict[str, Any]:
        return self.broadcast("ping", **options)

    def inspect(self, method: str, **options: Any) -> dict[str, Any]:
        """``active``, ``registered``, ``stats``, ``active_queues``, ``revoked`` ... of
        each worker that answers within the timeout."""
        return self.broadcast(method, **options)

    def revoke(self, task_ids: str | Sequence[str], *, terminate: bool = False,
               wait: float = 0.0) -> dict[str, Any]:
        """Revoke tasks: a worker that gets one later dead-letters it (reason ``revoked``)
        and its caller gets TaskRevoked; with ``terminate``, one running now is stopped (its
        slot process killed and replaced). Kept in the broker for ``revoke_expires``, so a
        worker that starts later refuses them too. ``wait``: collect the workers' replies
        for that long (``{node: {"ok": ...}}``); 0: don't wait."""
        ids = [task_ids] if isinstance(task_ids, str) else list(task_ids)
        if not ids:
            return {}
        with self.link() as link:
            link.store_revoked(ids, time.time() + self.config.revoke_expires)
            return self.broadcast("revoke", {"task_id": ids, "terminate": terminate,
                                             "signal": "SIGKILL", "stored": True},
                                  reply=wait > 0, timeout=wait or DEFAULT_TIMEOUT, link=link)

    def events(self, *, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """The events workers publish from now on (workers run with ``-E``), as they come;
        stops after ``timeout`` seconds (None: never)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.link() as link:
            link.watch_events()
            while deadline is None or time.monotonic() < deadline:
                left = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
                link.wait(min(left, 1.0))
                yield from link.events()
                link.tick()
