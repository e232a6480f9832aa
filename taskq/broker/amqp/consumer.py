"""Consuming: a worker slot's connection.

The slot's thread waits on the socket with ``poll`` (alongside the other descriptors it
watches, e.g. its wake-up pipe) and then drains what arrived: reading never waits for a frame
that has not started to arrive. Setting up, cancelling and confirmed publishes do wait for the
broker's answer. While a task runs in that thread, a heartbeat thread writes to the
connection under the same lock as the slot.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from amqp import exceptions as amqp_errors

from ...message import Delivery, Envelope
from . import delays, topology
from .channel import ConfirmChannel, publish_args, raw_writer
from .connection import Connector, close_quietly, drop
from .frames import Input, ack_frame, delivery, publish_frames, read_waiting
from .properties import encode_properties

DeliveryCallback = Callable[[Delivery], None]


def _result_properties(content_type: str, correlation_id: str) -> dict[str, Any]:
    return {
        "content_type": content_type,
        "delivery_mode": 2,
        "correlation_id": correlation_id,
        "content_encoding": "utf-8" if content_type == "application/json" else "binary",
    }


def plain_channel(connection: Any) -> Any:
    channel = connection.channel()
    channel.auto_decode = False  # bodies stay bytes: the codec decides
    return channel


class ConsumerConnection:
    """A connection whose plain channel consumes queues into a callback."""

    def __init__(
        self,
        connector: Connector,
        on_delivery: DeliveryCallback,
        *,
        timeout: float,
        name: str,
    ) -> None:
        self.connection = connector.connect_once(timeout=timeout, name=name)
        #: When it was opened (monotonic): tells a slot's late-noticed loss from a new outage.
        self.opened_at = time.monotonic()
        try:
            self.channel = plain_channel(self.connection)
        except BaseException:
            drop(self.connection)
            raise
        self._on_delivery = on_delivery
        #: What the connection has to read (for the slot's thread).
        self.input = Input(self.connection)
        self._queue_of: dict[str, str] = {}
        # RabbitMQ cancels a consumer whose queue is deleted; treat it like a lost connection.
        self.cancelled_by_broker: list[str] = []

    # -- consuming ---------------------------------------------------------------------------

    def consume(self, queue: str) -> str:
        tag: str = self.channel.basic_consume(
            queue, no_ack=False, callback=self._on_message, on_cancel=self._on_cancel
        )
        self._queue_of[tag] = queue
        return tag

    def _on_cancel(self, consumer_tag: str) -> None:
        self.cancelled_by_broker.append(self._queue_of.get(consumer_tag, consumer_tag))

    def cancel_all(self) -> None:
        for tag in list(self._queue_of):
            self.channel.basic_cancel(tag)
        self._queue_of.clear()

    def _on_message(self, message: Any) -> None:
        queue = self._queue_of.get(message.delivery_info.get("consumer_tag", ""), "")
        self._on_delivery(delivery(message, queue))

    # -- the event loop's side ---------------------------------------------------------------

    def drain(self) -> None:
        """Handle every frame already received; return as soon as none is left.

        Raises ConnectionError if the broker cancelled a consumer (its queue was deleted):
        reconnecting declares the queue again.
        """
        read_waiting(self.connection, self.input.waiting)
        if self.cancelled_by_broker:
            raise ConnectionError(
                f"the broker cancelled the consumer of {', '.join(self.cancelled_by_broker)} "
                "(queue deleted?)"
            )

    def heartbeat_tick(self) -> None:
        self.connection.heartbeat_tick()

    @property
    def heartbeat_interval(self) -> float:
        return float(self.connection.heartbeat or 0)

    # -- settling ----------------------------------------------------------------------------

    def ack(self, tag: Any, multiple: bool = False) -> None:
        self.channel.basic_ack(tag, multiple)

    def close(self) -> None:
        close_quietly(self.connection)

    def drop(self) -> None:
        """Discard a connection that failed: no handshake with a broker that may be gone."""
        drop(self.connection)


class SlotConnection(ConsumerConnection):
    """A worker slot's connection: at most one unacked message, results, dead letters."""

    def __init__(
        self,
        connector: Connector,
        queues: list[str],
        on_delivery: DeliveryCallback,
        *,
        timeout: float,
        declared: set[str],
        name: str = "taskq worker",
    ) -> None:
        super().__init__(connector, on_delivery, timeout=timeout, name=name)
        self.queues = queues
        self.declared = declared
        # The slot's heartbeat thread writes to this connection while a task runs in the
        # slot's thread: every frame goes out whole, under one lock.
        self._write_lock = threading.Lock()
        write_frame = self.connection.frame_writer

        def locked_write_frame(*args: Any, **kwargs: Any) -> Any:
            with self._write_lock:
                return write_frame(*args, **kwargs)

        self.connection.frame_writer = locked_write_frame
        write = raw_writer(self.connection)

        def locked_write(data: bytes) -> None:
            with self._write_lock:
                write(data)

        self._write = locked_write
        # Results and acks go out on the consuming channel, unconfirmed: one channel keeps
        # a result ahead of its ack, and the broker need not confirm every result. What must
        # be stored before an ack (dead letters, retries, counted copies) goes out on this
        # confirm-mode channel, and the ack waits for its confirm.
        try:
            self.confirms = ConfirmChannel(self.connection, write=locked_write)
            for queue in queues:
                topology.declare_work_queue(self.channel, queue)
                topology.declare_dead_letter_queue(self.channel, queue)
                delays.bind_consumed(self.channel, queue, declared)
            # global=True: RabbitMQ applies it to the whole channel, so a slot consuming
            # several queues still holds one message at most (per-consumer: one per queue).
            self.channel.basic_qos(0, 1, True)
        except BaseException:
            drop(self.connection)  # e.g. a declaration conflict: don't leave it open
            raise

    def start(self) -> None:
        for queue in self.queues:
            self.consume(queue)

    def send_heartbeat(self) -> None:
        """Safe from another thread (frames are written under a lock)."""
        self.connection.send_heartbeat()

    def reply_and_ack(
        self,
        reply_to: str | None,
        correlation_id: str,
        body: bytes | None,
        content_type: str,
        delivery_tag: int,
    ) -> None:
        """Publish the result (if any), then ack its task, in one write.

        The ack follows the result on the same channel, so the broker has routed the result
        before it sees the ack; one write is one system call and one wake-up of the broker.
        Not ``mandatory``: a result whose caller is gone has nobody to go to.
        """
        ack = ack_frame(self.channel.channel_id, delivery_tag)
        if reply_to and body is not None:
            ack = self._result_frames(reply_to, correlation_id, body, content_type) + ack
        self._write(ack)

    def publish_result(
        self, reply_to: str, correlation_id: str, body: bytes, content_type: str
    ) -> None:
        """Publish a result without waiting (and without acking anything)."""
        self._write(self._result_frames(reply_to, correlation_id, body, content_type))

    def _result_frames(
        self, reply_to: str, correlation_id: str, body: bytes, content_type: str
    ) -> bytes:
        properties = encode_properties(_result_properties(content_type, correlation_id))
        return publish_frames(
            self.channel.channel_id,
            publish_args("", reply_to, False),
            properties,
            body,
            self.connection.frame_max,
        )

    def publish_confirmed(self, envelope: Envelope, timeout: float) -> None:
        """Publish (a dead letter, a retry, a counted redelivery) and wait for the confirm."""
        if envelope.queue not in self.queues:
            topology.declare_work_queue(self.confirms.channel, envelope.queue)
        deadline = time.monotonic() + timeout
        reason = self.confirms.publish_and_wait(envelope, self.declared, deadline)
        if reason:
            raise amqp_errors.RecoverableChannelError(
                f"the broker did not take the message for {envelope.queue}: {reason}"
            )
