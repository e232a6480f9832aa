"""Brokers: one interface (:mod:`taskq.broker.base`), one package per broker below it.

The URL's scheme picks the broker: ``sqlite:///path.db`` is the embedded one
(:mod:`taskq.broker.sqlite`, the default), ``amqp://`` / ``amqps://`` is RabbitMQ
(:mod:`taskq.broker.amqp`). Nothing outside a broker's package speaks its concepts.
"""

from __future__ import annotations

from ..config import Config
from ..errors import ConfigurationError
from .base import Admin, Broker, ClientLink, DeadLetter, Reply, SlotLink, WorkerSupport

__all__ = [
    "Admin",
    "Broker",
    "ClientLink",
    "DeadLetter",
    "Reply",
    "SlotLink",
    "WorkerSupport",
    "broker_for",
]

AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")


def broker_for(config: Config) -> Broker:
    """The broker the configured URL names."""
    scheme = config.broker_url.split("://", 1)[0].lower() if "://" in config.broker_url else ""
    if scheme in AMQP_SCHEMES:
        from .amqp import AmqpBroker

        return AmqpBroker(config)
    if scheme == "sqlite":
        from .sqlite import SqliteBroker

        return SqliteBroker(config)
    raise ConfigurationError(
        f"broker URL {config.display_url} names no broker taskq knows: use "
        "sqlite:///taskq.db (embedded, one machine) or amqp://user:password@host:5672/vhost "
        "(RabbitMQ; amqps:// for TLS)"
    )
