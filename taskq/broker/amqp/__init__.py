"""RabbitMQ (AMQP 0-9-1) broker: the production broker."""

from __future__ import annotations

from ...config import Config
from ...message import Delivery
from .client import ClientConnection
from .connection import Connector, describe, is_recoverable
from .consumer import DeliveryCallback, SlotConnection
from .topology import dead_letter_queue_name

__all__ = ["AmqpBroker", "Delivery", "dead_letter_queue_name", "describe", "is_recoverable"]


class AmqpBroker:
    """Makes the connections each part of taskq needs; holds what they share."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.connector = Connector(config)
        #: Queues some publisher of this process has declared: declare once, not per message.
        self.declared: set[str] = set()

    @property
    def display_url(self) -> str:
        return self.config.display_url

    is_recoverable = staticmethod(is_recoverable)
    describe = staticmethod(describe)

    def client_connection(self, *, timeout: float, name: str = "taskq client") -> ClientConnection:
        """A connection for publishing (and, on one per process, for reading replies)."""
        return ClientConnection(self.connector, self.declared, timeout=timeout, name=name)

    def slot_connection(
        self,
        queues: list[str],
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

    def after_fork(self) -> None:
        self.declared = set()
