"""Settings: one small frozen object, read from arguments first and the environment second."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .errors import ConfigurationError

DEFAULT_BROKER_URL = "amqp://guest:guest@localhost:5672//"
BROKER_URL_ENV = "TASKQ_BROKER_URL"

SERIALIZERS = ("json", "pickle")


@dataclass(frozen=True)
class Config:
    """Everything an :class:`~taskq.App` can be told, with safe defaults.

    Pass fields as keyword arguments to ``App(...)``; the broker URL defaults to
    ``$TASKQ_BROKER_URL``, then to a local RabbitMQ.
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

    @property
    def display_url(self) -> str:
        """The broker URL with its password masked: safe for logs and error messages."""
        return mask_url(self.broker_url)


def mask_url(url: str) -> str:
    """Replace the password in each of ``;``-separated broker URLs with ``****``."""
    return ";".join(_mask_one(part) for part in url.split(";"))


def _mask_one(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable broker URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return urlunsplit(parts._replace(netloc=f"{user}:****@{host}{port}"))
