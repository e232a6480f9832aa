"""A worker slot's link to RabbitMQ (:class:`~taskq.broker.base.SlotLink`).

Two connections: this one consumes and acks and never publishes (so a resource alarm never
blocks it); :class:`~taskq.broker.amqp.publisher.SlotPublisher` sends results and what must be
stored before an ack. The slot's thread waits on this socket with ``poll`` (alongside its
other descriptors) and then drains what arrived: reading never waits for a frame that has not
started to arrive. Everything that waits for the broker's answer is bounded (``Bound``).

One message at a time, on every queue type: prefetch 1 per consumer (global QoS is refused by
quorum queues and deprecated). A slot serving one queue keeps one consumer, and the broker
sends the next message when the ack frees the slot. A slot serving several queues consumes
them all only while idle: the first message in cancels the other consumers (one that arrives
in between goes straight back to its queue), and after the ack the slot asks the queues in
turn (``basic.get``, so none is starved) before it consumes them all again.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ...message import Delivery, Envelope
from ..base import NOTHING_AFTER, After, DeliveryCallback, Reply, SlotLink
from . import delays, flows, letters, lost, topology
from .connection import Connector, bound, close_quietly, drop
from .frames import Input, ack_frame, delivery, read_waiting
from .journal import Spool
from .publisher import SlotPublisher, locked_writers


def plain_channel(connection: Any) -> Any:
    channel = connection.channel()
    channel.auto_decode = False  # bodies stay bytes: the codec decides
    return channel


class SlotConnection(SlotLink):
    def __init__(
        self,
        connector: Connector,
        queues: Sequence[str],
        on_delivery: DeliveryCallback,
        *,
        timeout: float,
        declared: set[str],
        name: str = "taskq worker",
        spool: Spool | None = None,
    ) -> None:
        self.config = connector.config
        self.queues = list(queues)
        self.declared = declared
        self._on_delivery = on_delivery
        #: Warnings about the queues, for the worker's log (see ``check_queues``).
        self.warnings: list[str] = []
        deadline = time.monotonic() + timeout
        self.connection = connector.connect_once(timeout=timeout, name=name)
        self.opened_at = time.monotonic()
        self.publisher: SlotPublisher | None = None
        try:
            with bound(self.connection).until(deadline):
                self._write = locked_writers(self.connection)
                self.channel = plain_channel(self.connection)
                for queue in self.queues:
                    warning = topology.declare_work_queue(
                        self.connection, queue, self.config.max_priority_for(queue))
                    if warning:
                        self.warnings.append(warning)
                    if not topology.is_broadcast_queue(queue):
                        topology.declare_dead_letter_queue(self.channel, queue)
                    delays.bind_consumed(self.channel, queue, declared)
                self.channel.basic_qos(0, 1, False)
                #: The worker's queue for broadcasts: consumed on a channel of its own, so
                #: that the work queues keep their one consumer each (see _on_broadcast).
                self.broadcast_queue = next(
                    (q for q in self.queues if topology.is_broadcast_queue(q)), None)
                self.queues = [q for q in self.queues if not topology.is_broadcast_queue(q)]
                if self.broadcast_queue is not None:
                    self.bchannel = plain_channel(self.connection)
                    self.bchannel.basic_qos(0, 1, False)
            self.publisher = SlotPublisher(
                connector,
                deadline=deadline,
                declared=declared,
                known_queues=set(self.queues),
                spool=spool,
                name=f"{name} results",
            )
        except BaseException:
            self.drop()  # e.g. a declaration conflict: don't leave it open
            raise
        bound(self.connection).relax()
        self.input = Input(self.connection)
        self.counts = lost.Counts(self.connection)
        heartbeat = float(self.connection.heartbeat or 0)
        self.tick_interval = min(1.0, heartbeat / 4) if heartbeat else 1.0
        #: Consumer tag -> queue, for the consumers active now.
        self._queue_of: dict[str, str] = {}
        #: Tags cancelled without waiting: their callbacks stay until a later round trip, so a
        #: message that crossed the cancel still reaches us (and goes back to its queue).
        self._cancelled: list[str] = []
        self._holding: Any = None
        self._confirm_cancels = False
        self._paused = True
        self._turn = 0
        #: Lost-run counts found for messages held now: delivery tag -> count's queue name.
        self._counted: dict[Any, str] = {}
        #: The broadcast consumer's tag while it consumes, and a broadcast that came while a
        #: task ran (it runs next; its queue is this worker's alone, so it waits for no one).
        self._btag: str | None = None
        self._bwaiting: Delivery | None = None
        # RabbitMQ cancels a consumer whose queue is deleted; treat it like a lost connection.
        self.cancelled_by_broker: list[str] = []

    # -- consuming ---------------------------------------------------------------------------

    def start(self) -> None:
        self._paused = False
        if self._holding is None and not self._queue_of:
            self._consume_all()
        if self.broadcast_queue is not None and self._btag is None:
            with bound(self.connection).until(time.monotonic() + self.config.connect_timeout):
                self._btag = self.bchannel.basic_consume(
                    self.broadcast_queue, no_ack=False, callback=self._on_broadcast)

    def pause(self) -> None:
        self._paused = True
        if self._btag is not None:
            with bound(self.connection).until(time.monotonic() + self.config.connect_timeout):
                self.bchannel.basic_cancel(self._btag)
            self._btag = None
            if self._bwaiting is not None:  # not started: back to the worker's queue
                self.bchannel.basic_reject(self._bwaiting.tag[1], requeue=True)
                self._bwaiting = None
        if self._queue_of:
            deadline = time.monotonic() + self.config.connect_timeout
            with bound(self.connection).until(deadline):
                for tag in list(self._queue_of):
                    self.channel.basic_cancel(tag)
            self._queue_of.clear()
            self._forget_cancelled()

    def _consume_all(self) -> None:
        deadline = time.monotonic() + self.config.connect_timeout
        with bound(self.connection).until(deadline):
            for queue in self.queues:
                if self._holding is not None:
                    break  # a message came in while we waited for a consume-ok
                tag: str = self.channel.basic_consume(
                    queue, no_ack=False, callback=self._on_message, on_cancel=self._on_cancel
                )
                self._queue_of[tag] = queue
        if self._holding is not None and self._queue_of:
            self._cancel_others_nowait()  # the consumers made after it came in
        else:
            self._forget_cancelled()

    def _cancel_others_nowait(self) -> None:
        for tag in list(self._queue_of):
            self.channel.basic_cancel(tag, nowait=True)
            self._cancelled.append(tag)
        self._queue_of.clear()
        self._confirm_cancels = True

    def _settle_cancels(self) -> None:
        """Make sure no message that crossed the cancels waits unread while the task runs:
        one round trip after them, and all of them have arrived (and gone back)."""
        self._confirm_cancels = False
        deadline = time.monotonic() + self.config.connect_timeout
        with bound(self.connection).until(deadline):
            self.channel.basic_qos(0, 1, False)
        self._forget_cancelled()

    def _forget_cancelled(self) -> None:
        """After a round trip on the channel, nothing more comes for cancelled consumers."""
        callbacks = self.channel.callbacks
        for tag in self._cancelled:
            callbacks.pop(tag, None)
            self.channel.cancel_callbacks.pop(tag, None)
        self._cancelled.clear()

    def _on_cancel(self, consumer_tag: str) -> None:
        self.cancelled_by_broker.append(self._queue_of.get(consumer_tag, consumer_tag))

    def _on_message(self, message: Any) -> None:
        tag = message.delivery_info.get("consumer_tag", "")
        queue = self._queue_of.get(tag, "")
        if self._holding is not None or not queue:
            # Crossed a cancel: we run one message at a time, so back it goes, in place.
            self.channel.basic_reject(message.delivery_info["delivery_tag"], requeue=True)
            return
        self._take(delivery(message, queue))

    def _on_broadcast(self, message: Any) -> None:
        """A broadcast runs when the slot is free: at once if idle (the work queues' consumers
        are cancelled first, so no task message waits behind it), else after the running
        task, whose ack then cancels them (see _ack)."""
        received = delivery(message, self.broadcast_queue or "")
        received.tag = ("broadcast", received.tag)  # tags are per channel
        if self._paused:
            self.bchannel.basic_reject(received.tag[1], requeue=True)
        elif self._holding is None:
            if self._queue_of:
                self._cancel_others_nowait()
            self._holding = received.tag
            self._on_delivery(received)
        else:
            self._bwaiting = received

    def _take(self, received: Delivery) -> None:
        self._holding = received.tag
        if len(self.queues) > 1:
            self._cancel_others_nowait()
        self._on_delivery(received)

    def _released(self) -> None:
        """The held message was settled: take the next one."""
        was_broadcast = isinstance(self._holding, tuple)
        self._holding = None
        if self._bwaiting is not None and not self._paused:
            waiting, self._bwaiting = self._bwaiting, None
            self._holding = waiting.tag  # (the work queues' consumers went with the ack)
            self._on_delivery(waiting)
            return
        if was_broadcast:
            if not self._paused:
                self._consume_all()  # the work queues again
            return
        if len(self.queues) == 1 or self._paused:
            return  # one queue: its consumer stays, and the broker sends the next
        deadline = time.monotonic() + self.config.connect_timeout
        with bound(self.connection).until(deadline):
            for step in range(len(self.queues)):
                queue = self.queues[(self._turn + step) % len(self.queues)]
                message = self.channel.basic_get(queue, no_ack=False)
                if message is not None:
                    self._turn = (self._turn + step + 1) % len(self.queues)
                    self._forget_cancelled()
                    self._take(delivery(message, queue))
                    return
        self._consume_all()

    def drain(self) -> None:
        """Handle every frame already received; return as soon as none is left.

        Raises ConnectionError if the broker cancelled a consumer (its queue was deleted):
        reconnecting declares the queue again.
        """
        read_waiting(self.connection, self.input.waiting)
        if self._confirm_cancels:
            self._settle_cancels()
        if self.cancelled_by_broker:
            raise ConnectionError(
                f"the broker cancelled the consumer of {', '.join(self.cancelled_by_broker)} "
                "(queue deleted?)"
            )

    def admit(self, key: str, interval: float) -> bool:
        assert self.publisher is not None
        return self.publisher.admit(key, interval)

    def ready_now(self) -> bool:
        """Asks for each queue's count of ready messages (a passive declare). Deliveries that
        arrive meanwhile are taken as usual, so a look also finds what was on its way."""
        deadline = time.monotonic() + self.config.connect_timeout
        extra = [self.broadcast_queue] if self.broadcast_queue is not None else []
        with bound(self.connection).until(deadline):
            for queue in [*self.queues, *extra]:
                _, ready, _ = self.channel.queue_declare(queue=queue, passive=True)
                if ready:
                    return True
        return False

    def next_wakeup(self) -> float | None:
        return None

    def tick(self) -> None:
        self.connection.heartbeat_tick()
        assert self.publisher is not None
        self.publisher.tick()

    def keepalive(self) -> None:
        """Safe from another thread (frames are written under a lock)."""
        self.connection.send_heartbeat()
        assert self.publisher is not None
        self.publisher.keepalive()

    # -- lost runs ---------------------------------------------------------------------------

    def lost_runs(self, delivery: Delivery) -> int:
        """Runs cut short by their process's death: counted by whoever saw them die (see
        :mod:`taskq.broker.amqp.lost`); looked up only for a message the broker redelivers."""
        recorded = letters.delivery_count(delivery)
        if not delivery.redelivered:
            return recorded
        name = lost.key(delivery)
        if name is None:
            return recorded
        deadline = time.monotonic() + self.config.connect_timeout
        with bound(self.connection).until(deadline):
            count = self.counts.count(name)
        if count:
            self._counted[delivery.tag] = name
        return recorded + count

    def run_record(self, delivery: Delivery) -> bytes:
        name = lost.key(delivery)
        return name.encode("utf-8", "surrogatepass") if name else b""

    def hold_handle(self) -> int | None:
        return int(self.connection.sock.fileno())

    # -- settling ----------------------------------------------------------------------------

    def settle(self, delivery: Delivery, reply: Reply | None, after: After = NOTHING_AFTER) -> None:
        """Send the result (if any), store what ``after`` holds, then ack its task.

        The result is written before the ack (on the publishing connection, unconfirmed); not
        ``mandatory``: a result whose caller is gone has nobody to go to. What ``after``
        holds is confirmed before the ack (see :mod:`.flows` for a second copy's fate).
        """
        if reply is not None:
            self.reply(delivery, reply)
        if after is not NOTHING_AFTER:
            assert self.publisher is not None
            self.publisher.after(delivery, after)
        self._ack(delivery)

    def is_copy(self, delivery: Delivery) -> bool:
        if flows.ONCE_HEADER not in delivery.headers:
            return False
        assert self.publisher is not None
        return self.publisher.is_copy(delivery)

    def reply(self, delivery: Delivery, reply: Reply) -> None:
        assert self.publisher is not None
        self.publisher.result(delivery, reply)

    def dead_letter(
        self, delivery: Delivery, exc_type: str, reason: str, worker: str, reply: Reply | None
    ) -> str:
        assert self.publisher is not None
        envelope = letters.dead_letter(
            delivery, exc_type, reason, worker, self.publisher.max_properties
        )
        self.publisher.store(envelope)
        if reply is not None:
            self.reply(delivery, reply)
        self._ack(delivery)
        return envelope.queue

    def forward(self, delivery: Delivery, envelope: Envelope, reply: Reply | None) -> None:
        assert self.publisher is not None
        self.publisher.store(envelope)
        if reply is not None:
            self.reply(delivery, reply)
        self._ack(delivery)

    def requeue_lost(self, delivery: Delivery) -> None:
        """Count the lost run (stored first), then put the message back in its place."""
        name = lost.key(delivery)
        assert self.publisher is not None
        if name is not None:  # (no task id: not a task message, dead-lettered anyway)
            self.publisher.record_lost(name)
        if isinstance(delivery.tag, tuple):
            self.bchannel.basic_reject(delivery.tag[1], requeue=True)
        else:
            if self._bwaiting is not None and self._queue_of:
                self._cancel_others_nowait()
            self.channel.basic_reject(delivery.tag, requeue=True)
        self._counted.pop(delivery.tag, None)
        self._released()

    def _ack(self, delivery: Delivery) -> None:
        if isinstance(delivery.tag, tuple):  # a broadcast, on its own channel
            self._write(ack_frame(self.bchannel.channel_id, delivery.tag[1]))
        else:
            if self._bwaiting is not None and self._queue_of:
                # A broadcast waits: stop the work queues before the ack, or the broker
                # sends the next task message, which would wait behind it.
                self._cancel_others_nowait()
            self._write(ack_frame(self.channel.channel_id, delivery.tag))
        name = self._counted.pop(delivery.tag, None)
        if name is not None:
            self.counts.forget(name)
        self._released()

    # -- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.close()
        close_quietly(self.connection)

    def drop(self) -> None:
        """Discard a link that failed: no handshake with a broker that may be gone."""
        if self.publisher is not None:
            self.publisher.drop()
        drop(self.connection)
