"""A client's connection to RabbitMQ (:class:`~taskq.broker.base.ClientLink`): confirmed
publishing, and on one of them the process's reply queue.

Used by one thread at a time. The connection that also consumes the reply queue is read by
whichever thread is using it (a sender waiting for its confirm, a caller waiting for a
result), which files every result it reads: no hand-off to another thread on the way.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from amqp import exceptions as amqp_errors

from ...errors import DeclarationConflict, MessageNacked, Unroutable
from ...message import Delivery, Envelope
from ..base import ClientLink
from . import delays, flows, topology
from .channel import ConfirmChannel
from .connection import Connector, abandon_after_fork, bound, close_quietly, drop
from .consumer import plain_channel
from .frames import Input, delivery, read_waiting

log = logging.getLogger("taskq.publish")

#: While sending a batch, read the broker's confirms after every this many messages.
CONFIRM_WINDOW = 256


class ClientConnection(ClientLink):
    """Publishes task messages with ``mandatory`` and waits for the broker's confirms.

    ``declared`` is shared by all connections of an app: a queue declared once exists for all.
    """

    def __init__(
        self,
        connector: Connector,
        declared: set[str],
        *,
        timeout: float,
        name: str = "taskq client",
    ) -> None:
        self.pid = os.getpid()
        self.blocked: str | None = None
        self.config = connector.config
        self.setup_timeout = connector.config.connect_timeout
        deadline = time.monotonic() + timeout
        self.connection = connector.connect_once(
            timeout=timeout,
            name=name,
            on_blocked=self._on_blocked,
            on_unblocked=self._on_unblocked,
        )
        self.bound = bound(self.connection)
        try:
            with self.bound.until(deadline):
                self.channel = ConfirmChannel(self.connection)
        except BaseException:
            drop(self.connection)
            raise
        # Each call bounded by one publish_timeout; .delay() then needs no system call to
        # set its own (see Bound.until).
        self.bound.set(connector.config.publish_timeout)
        self.declared = declared
        self.replies: Any = None
        self._on_reply: Callable[[Delivery], None] | None = None
        self._cancelled = False
        #: What the connection has to read (for the thread holding the lead).
        self.input = Input(self.connection)
        heartbeat = float(self.connection.heartbeat or 0)
        self.tick_interval = heartbeat / 4 if heartbeat else 1.0

    def _on_blocked(self, reason: str) -> None:
        self.blocked = reason or "resource alarm"

    def _on_unblocked(self) -> None:
        self.blocked = None

    def _ensure_queue(self, queue: str) -> None:
        if queue in self.declared:
            return
        try:
            topology.declare_work_queue(
                self.connection, queue, self.config.max_priority_for(queue))
        except DeclarationConflict as exc:
            if "x-max-priority" in str(exc):
                raise  # priorities asked for (or not) that the queue would not honour
            # The queue exists, with arguments someone else chose: it can still take our
            # messages. Workers report such conflicts; a publisher only needs the queue.
            log.warning("%s; publishing to it as it is", exc)
        self.declared.add(queue)

    def _ensure(self, envelope: Envelope) -> None:
        """Declare where ``envelope`` goes: its queue, or the topic exchange."""
        if envelope.broadcast:
            exchange = topology.broadcast_exchange(envelope.queue)
            if exchange not in self.declared:
                self.channel.channel.exchange_declare(exchange, "fanout", durable=True,
                                                      auto_delete=False)
                self.declared.add(exchange)
        elif envelope.routing_key is None:
            self._ensure_queue(envelope.queue)
        elif topology.TOPIC_MARKER not in self.declared:
            topology.declare_topic_exchange(self.channel.channel)
            self.declared.add(topology.TOPIC_MARKER)

    def publish(self, envelope: Envelope, deadline: float) -> None:
        """Send one message and return once the broker confirmed it (raise otherwise)."""
        with self.bound.until(deadline):
            self._ensure(envelope)
            seq = self._send(envelope)
            self.channel.wait_until(seq, deadline)
        self._check(seq, envelope)

    def _send(self, envelope: Envelope) -> int:
        if envelope.once:  # a workflow's: one copy runs (see flows)
            envelope = flows.marked(envelope)
        exchange, routing_key = delays.route(self.channel.channel, envelope, self.declared)
        return self.channel.send_envelope(envelope, exchange, routing_key)

    def publish_many(
        self, envelopes: Sequence[Envelope], deadline: float, confirmed: set[str]
    ) -> dict[str, str]:
        """Send all with pipelined confirms; return ``{task_id: reason}`` for refused ones.

        Adds the ids the broker confirmed to ``confirmed`` as it goes, so that after a
        connection error the caller resends only the rest.
        """
        channel = self.channel
        sent: list[tuple[int, Envelope]] = []
        try:
            with self.bound.until(deadline):
                for env in {(e.queue, e.routing_key, e.broadcast): e
                            for e in envelopes}.values():
                    self._ensure(env)
                for i, env in enumerate(envelopes, 1):
                    sent.append((self._send(env), env))
                    if i % CONFIRM_WINDOW == 0:
                        # Read the acks that arrived meanwhile: keeps both socket buffers
                        # moving (and notices a broker that stopped reading).
                        channel.poll()
                        if time.monotonic() > deadline:
                            raise TimeoutError("timed out sending to the broker")
                if sent:
                    channel.wait_until(sent[-1][0], deadline)
        finally:
            # Settled is not confirmed: a nacked or returned message was not queued.
            outstanding, nacked, returned = channel.outstanding, channel.nacked, channel.returned
            confirmed.update(
                env.task_id
                for seq, env in sent
                if seq not in outstanding
                and seq not in nacked
                and env.correlation_id not in returned
            )
        failures: dict[str, str] = {}
        for seq, env in sent:
            try:
                self._check(seq, env)
            except (Unroutable, MessageNacked) as exc:
                confirmed.discard(env.task_id)
                failures[env.task_id] = str(exc)
        return failures

    def _check(self, seq: int, envelope: Envelope) -> None:
        channel = self.channel
        if channel.returned:
            reason = channel.returned.pop(envelope.correlation_id, None)
            if reason is not None:
                channel.nacked.discard(seq)
                if envelope.broadcast:
                    raise Unroutable(
                        f"broadcast {envelope.task_id} was not sent: no worker of queue "
                        f"{envelope.queue!r} is up to receive it"
                    )
                if envelope.routing_key is not None:
                    raise Unroutable(
                        f"task {envelope.task_id} was not queued: no queue is bound to a "
                        f"pattern that routing key {envelope.routing_key!r} matches (bind one: "
                        "taskq worker -Q QUEUE --bind PATTERN)"
                    )
                self.declared.discard(envelope.queue)
                raise Unroutable(
                    f"task {envelope.task_id} was not queued: {reason}. Was queue "
                    f"{envelope.queue!r} deleted? Sending again declares it."
                )
        if seq in channel.nacked:
            channel.nacked.discard(seq)
            raise MessageNacked(
                f"the broker refused task {envelope.task_id} (basic.nack): it could not store "
                "the message; see the broker's log"
            )

    def close(self) -> None:
        if self.pid != os.getpid():
            self.abandon()
            return
        close_quietly(self.connection)

    def drop(self) -> None:
        """Discard a publisher after an error: its connection may be blocked or dead."""
        if self.pid != os.getpid():
            self.abandon()
            return
        drop(self.connection)

    def abandon(self) -> None:
        """Forget a publisher inherited across ``fork()`` without disturbing the parent."""
        abandon_after_fork(self.connection)

    # -- the reply queue (on one connection per process) --------------------------------------

    def consume_replies(
        self, queue: str, expires: float, on_reply: Callable[[Delivery], None], *, must_exist: bool
    ) -> bool:
        """Declare and consume ``queue``; False if it was gone although it should have existed
        (results sent to it meanwhile are lost)."""
        intact = True
        with self.bound.until(time.monotonic() + self.setup_timeout):
            channel = plain_channel(self.connection)
            if must_exist:
                try:
                    channel.queue_declare(queue=queue, passive=True)
                except amqp_errors.NotFound:
                    intact = False
                    channel = plain_channel(self.connection)
            topology.declare_reply_queue(channel, queue, expires)
            self._on_reply = on_reply
            channel.basic_consume(
                queue, no_ack=False, callback=self._on_reply_message,
                on_cancel=self._on_reply_cancel,
            )
        self.replies = channel
        return intact

    def _on_reply_message(self, message: Any) -> None:
        assert self._on_reply is not None
        self._on_reply(delivery(message, queue=""))
        # Acked once filed: the result now lives in the client's memory.
        self.replies.basic_ack(message.delivery_info["delivery_tag"])

    def _on_reply_cancel(self, consumer_tag: str) -> None:
        self._cancelled = True

    # -- reading -------------------------------------------------------------------------------

    def drain(self) -> None:
        """Handle every frame already received (results are filed); never blocks."""
        read_waiting(self.connection, self.input.waiting)
        if self._cancelled:
            raise ConnectionError("the broker cancelled the reply queue's consumer (deleted?)")

    def tick(self) -> None:
        self.connection.heartbeat_tick()

    def delete_replies(self, queue: str) -> None:
        with self.bound.until(time.monotonic() + min(2.0, self.setup_timeout)):
            self.channel.channel.queue_delete(queue)
