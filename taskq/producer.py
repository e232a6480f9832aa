"""Sending task messages: on the primary connection when it is free, else on a pooled one.

Connections are not thread-safe (frames of concurrent publishes would interleave), so each
send uses one connection for its duration: the primary (which also reads this process's reply
queue, see :mod:`taskq.replies`) when no other thread is using it, else one from a pool, so
many threads can send at once. A send that meets a broker outage reconnects with backoff until
``publish_timeout`` and then raises :class:`~taskq.BrokerUnavailable`; it never reports success
for a message the broker did not confirm. After ``os.fork()`` the child starts with an empty
pool and never touches the parent's sockets.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence

from .broker import Broker
from .broker.base import ClientLink
from .config import Config
from .errors import BatchPublishError, BrokerUnavailable, MessageTooLarge, PublishError
from .message import Envelope
from .replies import ReplyConsumer

log = logging.getLogger("taskq.publish")

#: Idle connections kept for reuse; more threads than this still work, they just reconnect.
MAX_IDLE = 16

Attempt = Callable[[ClientLink, float], None]


class Producer:
    def __init__(
        self, broker: Broker, config: Config, replies: Callable[[], ReplyConsumer | None]
    ) -> None:
        self.broker = broker
        self.config = config
        self._replies = replies
        self._idle: list[tuple[ClientLink, float]] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        # An idle connection older than this may have been dropped by the broker for missed
        # heartbeats (nobody reads it while idle): replace it instead of finding out.
        self._max_idle_age = (config.heartbeat or 60.0) * 0.75

    # -- the pool ------------------------------------------------------------------------------

    def _acquire(self, deadline: float) -> ClientLink:
        if self._pid != os.getpid():
            self._after_fork()
        now = time.monotonic()
        with self._lock:
            while self._idle:
                conn, since = self._idle.pop()
                if now - since < self._max_idle_age:
                    return conn
                conn.drop()
        return self.broker.client_link(
            timeout=max(0.05, deadline - time.monotonic()), name="taskq producer"
        )

    def _release(self, conn: ClientLink) -> None:
        if conn.pid != os.getpid():
            return
        with self._lock:
            if len(self._idle) < MAX_IDLE:
                self._idle.append((conn, time.monotonic()))
                return
        conn.close()

    def _after_fork(self) -> None:
        """In a forked child: a fresh lock (a parent thread may have held this one at the
        fork, and it is not here to release it), the parent's connections left alone."""
        self._lock = threading.Lock()
        idle, self._idle = self._idle, []
        for conn, _ in idle:
            conn.abandon()
        self._pid = os.getpid()
        self.broker.after_fork()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            conn.close()

    # -- sending -------------------------------------------------------------------------------

    def check_size(self, envelope: Envelope) -> None:
        check_size(envelope, self.config.max_message_size)

    def send(self, envelope: Envelope) -> None:
        """Publish one message; return once the broker has confirmed it."""
        self.check_size(envelope)
        self._with_retries(
            lambda conn, deadline: conn.publish(envelope, deadline),
            what=f"send task {envelope.task_id}",
        )

    def send_many(self, envelopes: Sequence[Envelope]) -> dict[str, str]:
        """Publish with pipelined confirms; return ``{task_id: reason}`` for refused ones.

        After a connection error only the messages not yet confirmed are sent again.
        """
        for envelope in envelopes:
            self.check_size(envelope)
        confirmed: set[str] = set()
        refused: dict[str, str] = {}

        def attempt(conn: ClientLink, deadline: float) -> None:
            remaining = [
                e for e in envelopes if e.task_id not in confirmed and e.task_id not in refused
            ]
            refused.update(conn.publish_many(remaining, deadline, confirmed))

        try:
            self._with_retries(attempt, what=f"send {len(envelopes)} tasks")
        except BrokerUnavailable as exc:
            failed = [e.task_id for e in envelopes if e.task_id not in confirmed]
            raise BatchPublishError(
                f"{len(failed)} of {len(envelopes)} tasks were not confirmed: {exc}",
                failed=failed,
            ) from exc
        return refused

    def _attempt(self, attempt: Attempt, deadline: float) -> None:
        """One try: on the primary connection if it is free, else on a pooled one."""
        replies = self._replies()
        primary = replies.lend() if replies is not None else None
        if primary is not None:
            assert replies is not None
            try:
                attempt(primary, deadline)
            except BaseException as exc:
                replies.give_back(primary, exc)  # after a connection error: the keeper's job
                raise
            replies.give_back(primary)
            return
        conn = self._acquire(deadline)
        try:
            attempt(conn, deadline)
        except PublishError:
            self._release(conn)  # the broker answered (returned or nacked): the link is fine
            raise
        except BaseException as exc:
            conn.drop()
            exc.blocked = conn.blocked  # type: ignore[attr-defined]
            raise
        self._release(conn)

    def _with_retries(self, attempt: Attempt, *, what: str) -> None:
        deadline = time.monotonic() + self.config.publish_timeout
        delay = 0.05
        failures = 0
        last: BaseException | None = None
        blocked: str | None = None
        while True:
            try:
                self._attempt(attempt, deadline)
                return
            except (PublishError, BrokerUnavailable):
                raise
            except BaseException as exc:
                if not self.broker.is_recoverable(exc):
                    raise
                blocked = getattr(exc, "blocked", None) or blocked
                last = exc
                failures += 1
                if failures == 1:
                    log.warning(
                        "could not %s (%s); retrying for up to %gs",
                        what,
                        self.broker.describe(exc),
                        self.config.publish_timeout,
                    )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerUnavailable(self._unavailable_message(what, last, blocked)) from last
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 1.0)

    def _unavailable_message(
        self, what: str, last: BaseException | None, blocked: str | None
    ) -> str:
        url = self.broker.display_url
        seconds = self.config.publish_timeout
        if blocked:
            return (
                f"could not {what} within {seconds:g}s: the broker at {url} is blocking "
                f"publishers ({blocked}: a memory or disk alarm); the message may not have "
                "been stored. Free memory/disk on the broker, or raise publish_timeout."
            )
        detail = self.broker.describe(last) if last else "no answer"
        return (
            f"could not {what} within {seconds:g}s: the broker at {url} did not confirm it "
            f"({detail}). {self.broker.unreachable_hint} (publish_timeout={seconds:g}s)"
        )


def check_size(envelope: Envelope, limit: int) -> None:
    """Raise MessageTooLarge, saying what to do, for a message over ``limit`` bytes."""
    if len(envelope.body) > limit:
        raise MessageTooLarge(
            f"task {envelope.headers.get('task')} message is {len(envelope.body):,} bytes, "
            f"over max_message_size={limit:,}: pass a reference (a path, a URL, a row id) "
            "instead of the data, or raise App(max_message_size=...)"
        )
