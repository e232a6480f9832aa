"""A worker slot's connection to RabbitMQ (:class:`~taskq.broker.base.SlotLink`).

The slot's thread waits on the socket with ``poll`` (alongside the other descriptors it
watches, e.g. its wake-up pipe) and then drains what arrived: reading never waits for a frame
that has not started to arrive. Setting up, cancelling and confirmed publishes do wait for the
broker's answer. While a task runs in that thread, the slot's keepalive thread writes
heartbeats to the connection under the same lock as the slot.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from amqp import exceptions as amqp_errors

from ...message import DELIVERY_COUNT_HEADER, Delivery, Envelope
from ..base import DeliveryCallback, Reply, SlotLink
from . import delays, letters, topology
from .channel import ConfirmChannel, publish_args, raw_writer
from .connection import Connector, close_quietly, drop
from .frames import Input, ack_frame, delivery, publish_frames, read_waiting
from .properties import encode_properties


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


class SlotConnection(SlotLink):
    """A worker slot's connection: at most one unacked message, results, dead letters."""

    def __init__(
        self,
        connector: Connector,
        queues: Sequence[str],
        on_delivery: DeliveryCallback,
        *,
        timeout: float,
        declared: set[str],
        name: str = "taskq worker",
    ) -> None:
        self.config = connector.config
        self.connection = connector.connect_once(timeout=timeout, name=name)
        self.opened_at = time.monotonic()
        self.queues = list(queues)
        self.declared = declared
        self._on_delivery = on_delivery
        self._queue_of: dict[str, str] = {}
        # RabbitMQ cancels a consumer whose queue is deleted; treat it like a lost connection.
        self.cancelled_by_broker: list[str] = []
        # The keepalive thread writes heartbeats while a task runs in the slot's thread:
        # every frame goes out whole, under one lock.
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
            self.channel = plain_channel(self.connection)
            self.input = Input(self.connection)
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
        self.tick_interval = min(1.0, self.heartbeat_interval / 4) or 1.0

    @property
    def heartbeat_interval(self) -> float:
        return float(self.connection.heartbeat or 0)

    # -- consuming ---------------------------------------------------------------------------

    def start(self) -> None:
        for queue in self.queues:
            if queue not in self._queue_of.values():
                tag: str = self.channel.basic_consume(
                    queue, no_ack=False, callback=self._on_message, on_cancel=self._on_cancel
                )
                self._queue_of[tag] = queue

    def pause(self) -> None:
        for tag in list(self._queue_of):
            self.channel.basic_cancel(tag)
        self._queue_of.clear()

    def _on_cancel(self, consumer_tag: str) -> None:
        self.cancelled_by_broker.append(self._queue_of.get(consumer_tag, consumer_tag))

    def _on_message(self, message: Any) -> None:
        queue = self._queue_of.get(message.delivery_info.get("consumer_tag", ""), "")
        received = delivery(message, queue)
        if received.redelivered and self._recounted(received):
            return
        self._on_delivery(received)

    def _recounted(self, received: Delivery) -> bool:
        """A redelivered message may have been cut short: record that in a copy and let the
        copy come round (classic queues keep no count). True if it was replaced so."""
        count = letters.delivery_count(received) + 1
        if count >= self.config.delivery_limit:
            received.headers[DELIVERY_COUNT_HEADER] = count
            return False
        self._publish_confirmed(letters.counted_copy(received, count))
        self._ack(received)
        return True

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

    def next_wakeup(self) -> float | None:
        return None

    def tick(self) -> None:
        self.connection.heartbeat_tick()

    def keepalive(self) -> None:
        """Safe from another thread (frames are written under a lock)."""
        self.connection.send_heartbeat()

    # -- settling ----------------------------------------------------------------------------

    def settle(self, delivery: Delivery, reply: Reply | None) -> None:
        """Publish the result (if any), then ack its task, in one write.

        The ack follows the result on the same channel, so the broker has routed the result
        before it sees the ack; one write is one system call and one wake-up of the broker.
        Not ``mandatory``: a result whose caller is gone has nobody to go to.
        """
        ack = ack_frame(self.channel.channel_id, delivery.tag)
        if reply is not None and delivery.reply_to:
            ack = self._result_frames(delivery, reply) + ack
        self._write(ack)

    def reply(self, delivery: Delivery, reply: Reply) -> None:
        if delivery.reply_to:
            self._write(self._result_frames(delivery, reply))

    def _result_frames(self, delivery: Delivery, reply: Reply) -> bytes:
        correlation_id = delivery.correlation_id or delivery.task_id or ""
        properties = encode_properties(_result_properties(reply.content_type, correlation_id))
        return publish_frames(
            self.channel.channel_id,
            publish_args("", str(delivery.reply_to), False),
            properties,
            reply.body,
            self.connection.frame_max,
        )

    def dead_letter(
        self, delivery: Delivery, exc_type: str, reason: str, worker: str, reply: Reply | None
    ) -> str:
        envelope = letters.dead_letter(delivery, exc_type, reason, worker)
        self._publish_confirmed(envelope)
        if reply is not None:
            self.reply(delivery, reply)
        self._ack(delivery)
        return envelope.queue

    def forward(self, delivery: Delivery, envelope: Envelope, reply: Reply | None) -> None:
        self._publish_confirmed(envelope)
        if reply is not None:
            self.reply(delivery, reply)
        self._ack(delivery)

    def requeue_lost(self, delivery: Delivery) -> None:
        self._publish_confirmed(
            letters.counted_copy(delivery, letters.delivery_count(delivery) + 1)
        )
        self._ack(delivery)

    def lost_runs(self, delivery: Delivery) -> int:
        return letters.delivery_count(delivery)

    def _ack(self, delivery: Delivery) -> None:
        self.channel.basic_ack(delivery.tag)

    def _publish_confirmed(self, envelope: Envelope) -> None:
        """Publish (a dead letter, a retry, a counted copy) and wait for the confirm."""
        if envelope.queue not in self.queues:
            topology.declare_work_queue(self.confirms.channel, envelope.queue)
        deadline = time.monotonic() + self.config.publish_timeout
        reason = self.confirms.publish_and_wait(envelope, self.declared, deadline)
        if reason:
            raise amqp_errors.RecoverableChannelError(
                f"the broker did not take the message for {envelope.queue}: {reason}"
            )

    # -- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        close_quietly(self.connection)

    def drop(self) -> None:
        """Discard a connection that failed: no handshake with a broker that may be gone."""
        drop(self.connection)
