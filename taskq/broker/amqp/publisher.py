"""A worker slot's publishing connection: results, and what must be stored before an ack.

A slot has two connections. The one it consumes on never publishes, so RabbitMQ never blocks
it: during a memory or disk alarm the broker stops reading every connection that publishes,
acks and all, and a slot that sent its results on its consuming connection would stall with
its message until the alarm cleared. This one sends:

* results, unconfirmed (persistent, to the caller's reply queue), on a plain channel: written
  before the ack goes out on the other connection, as before on one;
* dead letters, retries, messages not due yet and lost-run counts, confirmed (on a channel in
  confirm mode): the ack waits for the broker to have stored them.

Once the broker has said it blocks this connection (``connection.blocked``), what the slot
owes it goes to the slot's spool file instead (:class:`~taskq.broker.amqp.journal.Spool`) and
the slot settles its message and carries on; the spool is published, then emptied, as soon as
the broker unblocks. A publish already sent when the alarm began waits in the broker's socket
buffer and arrives when the alarm clears; at worst that one is stored twice.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from amqp import exceptions as amqp_errors

from ...config import Config
from ...errors import Unroutable
from ...message import Delivery, Envelope
from ..base import After, Reply
from . import flows, lost, topology
from .channel import ConfirmChannel, publish_args, raw_writer
from .connection import Connector, bound, close_quietly, drop
from .frames import Input, publish_frames, read_waiting
from .journal import Owed, Spool
from .properties import encode_properties

log = logging.getLogger("taskq.worker")


def result_properties(content_type: str, correlation_id: str) -> dict[str, Any]:
    return {
        "content_type": content_type,
        "delivery_mode": 2,
        "correlation_id": correlation_id,
        "content_encoding": "utf-8" if content_type == "application/json" else "binary",
    }


def locked_writers(connection: Any) -> Any:
    """Make every frame written to ``connection`` go out whole under one lock (a keepalive
    thread writes heartbeats while the slot's thread runs a task); return the raw writer."""
    lock = threading.Lock()
    write_frame = connection.frame_writer

    def locked_write_frame(*args: Any, **kwargs: Any) -> Any:
        with lock:
            return write_frame(*args, **kwargs)

    connection.frame_writer = locked_write_frame
    write = raw_writer(connection)

    def locked_write(data: bytes) -> None:
        with lock:
            write(data)

    return locked_write


class SlotPublisher:
    def __init__(
        self,
        connector: Connector,
        *,
        deadline: float,
        declared: set[str],
        known_queues: set[str],
        spool: Spool | None,
        name: str,
    ) -> None:
        self.config = connector.config
        self.declared = declared
        self._known = known_queues
        self.spool = spool
        self.blocked: str | None = None
        #: Spool entries already sent on this connection (index -> confirm sequence number).
        self._in_flight: dict[int, int] = {}
        self.connection = connector.connect_once(
            timeout=max(0.05, deadline - time.monotonic()),
            name=name,
            on_blocked=self._on_blocked,
            on_unblocked=self._on_unblocked,
        )
        try:
            with bound(self.connection).until(deadline):
                self._write = locked_writers(self.connection)
                self.results = self.connection.channel()
                self.confirms = ConfirmChannel(self.connection, write=self._write)
        except BaseException:
            drop(self.connection)
            raise
        bound(self.connection).relax()
        self.input = Input(self.connection)
        self.claims = flows.Claims(self.connection, self.confirms, self.config.workflow_expires)
        #: The most a message's encoded properties may take: its header frame must fit in
        #: one frame (frame_max, less the frame's 8 bytes and the header's own 12).
        #: Rate queues declared, and when to declare each again (monotonic).
        self._rate_queues: dict[str, float] = {}
        self.max_properties = int(self.connection.frame_max) - 8 - 12 - 64

    def _on_blocked(self, reason: str) -> None:
        self.blocked = reason or "resource alarm"
        log.warning(
            "the broker blocks publishing (%s): results and dead letters wait in this "
            "worker's spool until it takes them again; tasks keep running and being acked",
            self.blocked,
        )

    def _on_unblocked(self) -> None:
        self.blocked = None

    @property
    def owes(self) -> bool:
        return self.spool is not None and len(self.spool) > 0

    def _spooling(self) -> bool:
        if self.spool is None:
            return False
        if self.blocked is None and self.input.waiting():
            read_waiting(self.connection, self.input.waiting)  # a connection.blocked, maybe
        return self.blocked is not None or self.owes

    # -- results ---------------------------------------------------------------------------

    def result(self, delivery: Delivery, reply: Reply) -> None:
        """Send a caller its result (unconfirmed; nobody is there if its queue is gone)."""
        destination = reply.to or delivery.reply_to
        if not destination:
            return
        correlation_id = reply.correlation_id or delivery.correlation_id or delivery.task_id \
            or ""
        if self._spooling():
            assert self.spool is not None
            self.spool.append(Owed("result", Envelope(destination, reply.body,
                                                     reply.content_type, {}, correlation_id)))
            return
        self._write(self._result_frames(destination, correlation_id, reply))

    def _result_frames(self, destination: str, correlation_id: str, reply: Reply) -> bytes:
        properties = encode_properties(result_properties(reply.content_type, correlation_id))
        return publish_frames(
            self.results.channel_id,
            publish_args("", destination, False),
            properties,
            reply.body,
            self.connection.frame_max,
        )

    # -- what must be stored before the ack --------------------------------------------------

    def store(self, envelope: Envelope) -> None:
        """Publish and wait for the broker's confirm (or keep it in the spool while blocked)."""
        envelope = flows.marked(envelope)
        if self._spooling():
            assert self.spool is not None
            self.spool.append(Owed("store", envelope))
            return
        self._store_now(envelope)

    def _store_now(self, envelope: Envelope) -> None:
        deadline = time.monotonic() + self.config.publish_timeout
        with bound(self.connection).until(deadline):
            if envelope.routing_key is not None:
                if topology.TOPIC_MARKER not in self.declared:
                    topology.declare_topic_exchange(self.confirms.channel)
                    self.declared.add(topology.TOPIC_MARKER)
            elif envelope.queue not in self._known and envelope.queue not in self.declared:
                topology.declare_work_queue(self.connection, envelope.queue,
                                            self.config.max_priority_for(envelope.queue))
                self.declared.add(envelope.queue)
            seq = self.confirms.send_routed(envelope, self.declared)
            stored = self.confirms.wait_until(
                seq, deadline, give_up=lambda: self.blocked is not None and self.spool is not None
            )
        if not stored:
            # The broker blocked us with it in its socket buffer: it will take it when the
            # alarm clears. Keep it in the spool meanwhile (so it is not lost if we die), and
            # when the alarm clears wait for its confirm instead of sending it again.
            assert self.spool is not None
            self._in_flight[len(self.spool)] = seq
            self.spool.append(Owed("store", envelope))
            return
        reason = self.confirms.refusal(seq, envelope.correlation_id)
        if reason.startswith("no queue is bound") and envelope.routing_key is not None:
            raise Unroutable(f"task {envelope.task_id} was not stored: {reason}")
        if reason:
            raise amqp_errors.RecoverableChannelError(
                f"the broker did not take the message for {envelope.queue}: {reason}"
            )

    def admit(self, key: str, interval: float) -> bool:
        """Mark a start in the key's rate queue: True if the broker took the mark."""
        if self._spooling():
            return False  # the broker refuses publishes for now: not a start either
        queue = topology.rate_queue_name(key, interval)
        deadline = time.monotonic() + self.config.publish_timeout
        with bound(self.connection).until(deadline):
            if self._rate_queues.get(queue, 0.0) <= time.monotonic():
                topology.declare_rate_queue(self.confirms.channel, queue, interval)
                # Declared again well before it could expire unused (publishes don't count).
                self._rate_queues[queue] = (
                    time.monotonic() + topology.rate_queue_expires(interval) / 4)
            seq = self.confirms.send(b"", {"delivery_mode": 1}, "", queue, queue)
            self.confirms.wait_until(seq, deadline)
        refused = self.confirms.refusal(seq, queue)
        if refused and "no queue is bound" in refused:
            self._rate_queues.pop(queue, None)  # it expired after all: declare it next time
        return not refused

    # -- workflows (see :mod:`flows`) ---------------------------------------------------------

    def after(self, delivery: Delivery, after: After) -> None:
        """Store a workflow's next messages, tell other callers, add a chord's part (and,
        if that completes the chord, store its callback)."""
        for envelope in after.messages:
            self.store(envelope)
        for notice in after.replies:
            self.result(delivery, notice)
        part = after.join
        if part is None:
            return
        deadline = time.monotonic() + self.config.publish_timeout
        with bound(self.connection).until(deadline):
            parts = flows.join(self.connection, self.confirms, part,
                               self.config.workflow_expires, deadline)
        if parts is None:
            return
        self.store(part.complete(parts))
        with bound(self.connection).until(time.monotonic() + self.config.publish_timeout):
            flows.forget(self.confirms, part.chord)

    def is_copy(self, delivery: Delivery) -> bool:
        deadline = time.monotonic() + self.config.publish_timeout
        with bound(self.connection).until(deadline):
            return self.claims.is_copy(delivery, deadline)

    def record_lost(self, name: str) -> None:
        """Count one lost run of the message whose count is ``name`` (see :mod:`lost`)."""
        if self._spooling():
            assert self.spool is not None
            self.spool.append(Owed("lost", Envelope(name, b"", None, {})))
            return
        deadline = time.monotonic() + self.config.publish_timeout
        with bound(self.connection).until(deadline):
            lost.record(self.confirms, name, deadline)

    # -- the connection's own upkeep --------------------------------------------------------

    def tick(self) -> None:
        """Read what arrived (heartbeats, blocked/unblocked), keep it alive, pay what we owe."""
        read_waiting(self.connection, self.input.waiting)
        self.connection.heartbeat_tick()
        if self.blocked is None and self.owes:
            self.flush()

    def flush(self) -> None:
        """Publish the spool, confirmed, then empty it (once the broker takes publishes).

        If the link fails meanwhile the spool stays and the next link publishes it again: a
        caller drops a second copy of its result; a second retry runs the task once more.
        """
        assert self.spool is not None
        owed = list(self.spool)
        deadline = time.monotonic() + self.config.publish_timeout
        with bound(self.connection).until(deadline):
            if self._in_flight:  # sent before the block: the broker takes them first
                self.confirms.wait_until(max(self._in_flight.values()), deadline)
            rest = [item for i, item in enumerate(owed) if i not in self._in_flight]
            publish_owed(self.confirms, rest, self.declared, deadline, self.config)
        self._in_flight.clear()
        self.spool.clear()
        if owed:
            log.warning("published %d message(s) kept while the broker blocked", len(owed))

    def keepalive(self) -> None:
        self.connection.send_heartbeat()

    def close(self) -> None:
        close_quietly(self.connection)

    def drop(self) -> None:
        drop(self.connection)


def publish_owed(
    confirms: ConfirmChannel, owed: list[Owed], declared: set[str], deadline: float,
    config: Config,
) -> None:
    """Publish what a spool holds, confirmed (pipelined); raise if the broker refused any."""
    last = 0
    for item in owed:
        env = item.envelope
        if item.kind == "lost":
            lost.record(confirms, env.queue, deadline)
        elif item.kind == "result":
            properties = result_properties(env.content_type or "", env.correlation_id or "")
            last = confirms.send(env.body, properties, "", env.queue, None)
        else:
            if env.queue not in declared:
                if env.queue.endswith(".dlq"):
                    topology.declare_dead_letter_queue(confirms.channel, env.queue[:-4])
                else:
                    topology.declare_work_queue(confirms.connection, env.queue,
                                                config.max_priority_for(env.queue))
                declared.add(env.queue)
            last = confirms.send_routed(env, declared)
    if last:
        confirms.wait_until(last, deadline)
    if confirms.nacked:
        confirms.nacked.clear()
        raise amqp_errors.RecoverableChannelError("the broker refused part of the spool")
    confirms.returned.clear()  # a result whose caller is gone: nobody to tell
