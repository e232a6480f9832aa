"""RabbitMQ (AMQP 0-9-1): the broker for many machines."""

from __future__ import annotations

from collections.abc import Sequence

from ...config import Config
from ..base import Admin, Broker, DeliveryCallback
from . import letters, topology
from .admin import QueueAdmin
from .client import ClientConnection
from .connection import Connector, describe, is_recoverable
from .consumer import SlotConnection

__all__ = ["AmqpBroker"]


class AmqpBroker(Broker):
    """Makes the connections each part of taskq needs; holds what they share."""

    unreachable_hint = "Is RabbitMQ running and reachable?"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.connector = Connector(config)
        #: Queues some publisher of this process has declared: declare once, not per message.
        self.declared: set[str] = set()

    def client_link(self, *, timeout: float, name: str = "taskq client") -> ClientConnection:
        """A connection for publishing (and, on one per process, for reading replies)."""
        return ClientConnection(self.connector, self.declared, timeout=timeout, name=name)

    def slot_link(
        self,
        queues: Sequence[str],
        on_delivery: DeliveryCallback,
        *,
        timeout: float,
        name: str = "taskq worker",
    ) -> SlotConnection:
        return SlotConnection(
            self.connector,
            queues,
            on_delivery,
            timeout=timeout,
            declared=self.declared,
            name=name,
        )

    def admin(self, *, timeout: float) -> Admin:
        return QueueAdmin(self.connector, self.declared, timeout=timeout)

    def dead_letter_name(self, queue: str) -> str:
        return topology.dead_letter_queue_name(queue)

    def is_recoverable(self, exc: BaseException) -> bool:
        return is_recoverable(exc)

    def describe(self, exc: BaseException) -> str:
        return describe(exc)

    def explain(self, exc: BaseException) -> str | None:
        if letters.is_consumer_timeout(exc):
            return (
                "the broker closed the channel because a task held its message longer than "
                "RabbitMQ's consumer_timeout; the message goes back to the queue and will run "
                "again. Raise consumer_timeout on the broker (rabbitmq.conf) above the longest "
                "task, or split the task."
            )
        return None

    def after_fork(self) -> None:
        self.declared = set()
