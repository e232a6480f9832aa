"""Looking into a queue and moving its messages: what ``taskq dlq`` does on RabbitMQ.

Messages are read with ``basic.get`` without acking; whatever is not explicitly acked goes back
to its place in the queue when the reading channel closes. A message is moved by publishing a
copy (confirmed) and only then acking the original, so an interrupted move duplicates at worst.
"""

from __future__ import annotations

import time
from typing import Any

from amqp import exceptions as amqp_errors

from ...errors import BrokerError
from ...message import Delivery, Envelope
from . import topology
from .channel import ConfirmChannel
from .connection import Connector, close_quietly
from .frames import delivery


class QueueAdmin:
    def __init__(self, connector: Connector, declared: set[str], *, timeout: float) -> None:
        self.connection = connector.connect_once(timeout=timeout, name="taskq admin")
        self.confirms = ConfirmChannel(self.connection)
        self.declared = declared
        self._reader: Any = None
        self.timeout = timeout

    def close(self) -> None:
        close_quietly(self.connection)

    def __enter__(self) -> QueueAdmin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def size(self, queue: str) -> int:
        """Messages ready in ``queue``; raise BrokerError if there is no such queue."""
        channel = self.connection.channel()
        try:
            _, count, _ = channel.queue_declare(queue, passive=True)
        except amqp_errors.NotFound:
            raise BrokerError(f"queue {queue!r} does not exist on this broker/vhost") from None
        finally:
            if channel.is_open:
                channel.close()
        return int(count)

    def read(self, queue: str, limit: int) -> list[Delivery]:
        """Up to ``limit`` messages from the head of ``queue``, held (unacked) until
        :meth:`ack` or :meth:`release`."""
        if self._reader is None:
            self._reader = self.connection.channel()
            self._reader.auto_decode = False
        deliveries = []
        for _ in range(limit):
            message = self._reader.basic_get(queue, no_ack=False)
            if message is None:
                break
            deliveries.append(delivery(message, queue))
        return deliveries

    def ack(self, delivery: Delivery) -> None:
        self._reader.basic_ack(delivery.tag)

    def release(self) -> None:
        """Put every read-but-not-acked message back where it was."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def publish(self, envelope: Envelope) -> None:
        """Publish and wait for the broker's confirm (raise if it refuses)."""
        topology.declare_work_queue(self.confirms.channel, envelope.queue)
        deadline = time.monotonic() + self.timeout
        reason = self.confirms.publish_and_wait(envelope, self.declared, deadline)
        if reason:
            raise BrokerError(f"the broker did not take the message for {envelope.queue}: {reason}")

    def purge(self, queue: str) -> int:
        self.size(queue)
        channel = self.connection.channel()
        try:
            return int(channel.queue_purge(queue) or 0)
        finally:
            channel.close()
