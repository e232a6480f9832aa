"""Settings: one small frozen object, read from arguments first and the environment second."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigurationError

#: The embedded broker, in the working directory: nothing to install or start.
DEFAULT_BROKER_URL = "sqlite:///taskq.db"
BROKER_URL_ENV = "TASKQ_BROKER_URL"

SERIALIZERS = ("json", "pickle")
#: The highest priority a message can carry (one octet on the wire).
MAX_PRIORITY = 255


@dataclass(frozen=True)
class Config:
    """Everything an :class:`~taskq.App` can be told, with safe defaults.

    Pass fields as keyword arguments to ``App(...)``; the broker URL defaults to
    ``$TASKQ_BROKER_URL``, then to the embedded broker in ``./taskq.db``.
    """

    broker_url: str = DEFAULT_BROKER_URL
    #: Queue a task goes to when neither the task nor the call names one.
    default_queue: str = "taskq"
    #: How task arguments and results are encoded: "json" (default) or "pickle".
    serializer: str = "json"
    #: Content types a worker (and a result listener) will decode. Pickle only if listed here.
    accept: tuple[str, ...] = ("json",)
    #: Upper bound, in seconds, on one ``.delay()``: reconnecting while the broker is away,
    #: waiting for its confirm while it is blocked. Past it: ``taskq.BrokerUnavailable``.
    publish_timeout: float = 15.0
    #: TCP connect timeout for one attempt, seconds.
    connect_timeout: float = 4.0
    #: AMQP heartbeat interval requested from the broker, seconds (0 disables heartbeats).
    heartbeat: float = 30.0
    #: A client's reply queue is deleted by the broker after it has had no consumer this long.
    reply_queue_expires: float = 600.0
    #: Largest encoded task message ``.delay()`` will send, in bytes.
    max_message_size: int = 10 * 1024 * 1024
    #: A message whose worker died this many times is dead-lettered as poison.
    delivery_limit: int = 3
    #: TLS (``amqps://``): CA bundle to verify the broker against (default: system store).
    ssl_ca_file: str | None = None
    #: TLS client certificate and key, for brokers that require them.
    ssl_cert_file: str | None = None
    ssl_key_file: str | None = None
    #: Verify that the broker's certificate names the host in the URL. Leave on.
    ssl_verify_hostname: bool = True
    #: Priority queues: the highest priority their messages may have (1-255; RabbitMQ's
    #: ``x-max-priority``, 10 or less is best). An int makes every queue this app declares
    #: a priority queue; ``{"queue": 10}`` only the queues named. None: no priorities.
    max_priority: int | Mapping[str, int] | None = None
    #: Run every task in the calling process, at once, instead of sending it (for tests):
    #: ``.delay()`` returns an :class:`~taskq.result.EagerResult`. See :mod:`taskq.eager`.
    eager: bool = False
    #: How long the broker keeps what workflows need after their last use (seconds): a
    #: chord's parts while its header runs, and on RabbitMQ the mark that tells a workflow
    #: message's second copy from its first (one small queue per chain and per chord, for
    #: this long). Longer than any gap between a chord's parts.
    workflow_expires: float = 24 * 3600.0
    #: Which schedule in the broker this app's periodic tasks are (``app.schedule``, ``taskq
    #: beat``): its beats share one active scheduler and one record of what was fired. Apps
    #: with different schedules on one broker (vhost or file) need different names.
    beat_name: str = "default"
    #: How long the broker keeps a revocation (seconds), so that a worker that gets the
    #: task later (a countdown, a worker started later) still refuses it. A task revoked
    #: with a countdown longer than this may run.
    revoke_expires: float = 7 * 24 * 3600.0
    #: RabbitMQ: the management plugin's HTTP API, which ``taskq status`` asks for the
    #: vhost's queue names and unacked counts (AMQP can't tell them), e.g.
    #: ``http://user:password@host:15672``. None: ``http://<broker host>:15672`` with the
    #: broker URL's credentials, if it answers within a second; "": never.
    management_url: str | None = None
    #: Extra worker-side defaults: hard and soft time limits in seconds (None: no limit).
    time_limit: float | None = None
    soft_time_limit: float | None = None

    def __post_init__(self) -> None:
        if self.serializer not in SERIALIZERS:
            raise ConfigurationError(
                f"serializer must be one of {', '.join(SERIALIZERS)}, not {self.serializer!r}"
            )
        unknown = [name for name in self.accept if name not in SERIALIZERS]
        if unknown:
            raise ConfigurationError(
                f"accept lists unknown serializer(s) {unknown}; known: {', '.join(SERIALIZERS)}"
            )
        if self.serializer not in self.accept:
            raise ConfigurationError(
                f"serializer {self.serializer!r} is not in accept {list(self.accept)}: workers "
                f"would refuse every message; add it, e.g. accept=('json', {self.serializer!r})"
            )
        for name in ("publish_timeout", "connect_timeout", "reply_queue_expires"):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"{name} must be a positive number of seconds")
        if self.heartbeat < 0:
            raise ConfigurationError("heartbeat must be >= 0 seconds (0 disables heartbeats)")
        if self.delivery_limit < 1:
            raise ConfigurationError("delivery_limit must be at least 1")
        if self.max_message_size < 1024:
            raise ConfigurationError("max_message_size must be at least 1024 bytes")
        if not self.default_queue:
            raise ConfigurationError("default_queue must be a non-empty queue name")
        ceilings = (self.max_priority.values() if isinstance(self.max_priority, Mapping)
                    else [self.max_priority] if self.max_priority is not None else [])
        if not all(_whole(n) and 1 <= n <= MAX_PRIORITY for n in ceilings):
            raise ConfigurationError(
                f"max_priority must be a whole number from 1 to {MAX_PRIORITY} (or a mapping "
                f"of queue names to such numbers), not {self.max_priority!r}"
            )
        check_url(self.broker_url)
        if not isinstance(self.broker_url, BrokerURL):
            object.__setattr__(self, "broker_url", BrokerURL(self.broker_url))

    @classmethod
    def from_settings(cls, broker_url: str | None = None, **settings: Any) -> Config:
        """Build a Config from keyword settings, naming any that don't exist."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ConfigurationError(
                f"unknown setting(s) {', '.join(unknown)}; "
                f"known settings: {', '.join(sorted(known))}"
            )
        if "accept" in settings:
            settings["accept"] = tuple(settings["accept"])
        url = broker_url or os.environ.get(BROKER_URL_ENV) or DEFAULT_BROKER_URL
        return cls(broker_url=url, **settings)

    def max_priority_for(self, queue: str) -> int | None:
        """The priority range ``queue`` is declared with (None: not a priority queue)."""
        if isinstance(self.max_priority, Mapping):
            return self.max_priority.get(queue)
        return self.max_priority

    @property
    def display_url(self) -> str:
        """The broker URL with its password masked: safe for logs and error messages."""
        return mask_url(self.broker_url)


class BrokerURL(str):
    """A broker URL whose ``repr`` masks the password: the string itself is the real URL, but
    whatever shows locals or objects (tracebacks with locals, error trackers, debuggers,
    ``repr(config)``) sees ``user:****@host``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(mask_url(str(self)))


def mask_url(url: str) -> str:
    """Replace the password in each of ``;``-separated broker URLs with ``****``."""
    return ";".join(_mask_one(part) for part in url.split(";"))


def _split_userinfo(url: str) -> tuple[str, str, str] | None:
    """(scheme://, user[:password], rest) read by hand: the last '@' ends the userinfo, so a
    password with an unencoded '#', '/' or '?' can't hide there (``urlsplit`` would take it
    for a fragment, path or query and find no password to mask)."""
    scheme, sep, remainder = url.partition("://")
    if not sep or "@" not in remainder:
        return None
    userinfo, _, rest = remainder.rpartition("@")
    return scheme + sep, userinfo, rest


def _mask_one(url: str) -> str:
    parts = _split_userinfo(url)
    if parts is None:
        return url
    start, userinfo, rest = parts
    user, colon, _ = userinfo.partition(":")
    return f"{start}{user}:****@{rest}" if colon else url


def check_url(url: str) -> None:
    """Raise ConfigurationError, in one line with the password masked, for a broker URL that
    would not be read as the user meant."""
    for part in url.split(";"):
        part = part.strip()
        parts = _split_userinfo(part)
        if parts is not None and any(c in parts[1] for c in "#/?@"):
            raise ConfigurationError(
                f"broker URL {mask_url(part)} has a user or password with characters that end "
                "it early ('#', '/', '?' or '@'): percent-encode them (# as %23, / as %2F, "
                "? as %3F, @ as %40)"
            )
        try:
            urlsplit(part).port  # noqa: B018 - reading it is what checks it
        except ValueError:
            host = (parts[2] if parts else part.partition("://")[2]).split("/", 1)[0]
            raise ConfigurationError(
                f"broker URL {mask_url(part)} has a port that is not a number "
                f"({host.rpartition(':')[2]!r}): write host:port, e.g. localhost:5672"
            ) from None


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_priority(priority: object) -> int | None:
    """A message priority as given (None: the queue's lowest), or a one-line error."""
    if priority is None:
        return None
    if not _whole(priority) or not 0 <= priority <= MAX_PRIORITY:  # type: ignore[operator]
        raise ConfigurationError(
            f"priority must be a whole number from 0 to {MAX_PRIORITY} (higher runs first, "
            f"up to the queue's max_priority), not {priority!r}"
        )
    return priority  # type: ignore[return-value]
