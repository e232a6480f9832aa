"""Dead letters on RabbitMQ: what ``taskq dlq`` reads, replays and purges in ``<queue>.dlq``.

Letters are read by a consumer that never acks what it only looks at: closing its channel puts
every one back in its place. One letter at a time is decoded, so a dead-letter queue of
100,000 letters costs the socket's buffers, not 100,000 messages in memory. A letter is moved
by publishing a copy (confirmed, in windows of :data:`REPLAY_WINDOW`) and only then acking the
original, so an interrupted replay duplicates at worst.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from amqp import exceptions as amqp_errors

from ...errors import BrokerError
from ...message import Delivery, Envelope
from ..base import Admin, DeadLetter, QueueStats
from . import letters, topology
from .channel import ConfirmChannel
from .connection import Connector, close_quietly
from .consumer import plain_channel
from .frames import delivery
from .management import Management, is_work_queue

#: Replayed copies published before waiting for their confirms.
REPLAY_WINDOW = 256


class QueueAdmin(Admin):
    def __init__(self, connector: Connector, declared: set[str], *, timeout: float) -> None:
        self.connector = connector
        self.connection = connector.connect_once(timeout=timeout, name="taskq admin")
        #: Replayed copies go out on a connection of their own: waiting for their confirms
        #: then reads only confirms, while letters not read yet wait in the reader's socket
        #: (TCP holds the broker back) instead of piling up in memory.
        self._publisher: Any = None
        self.declared = declared
        self.timeout = timeout
        config = connector.config
        self.management = Management(config.broker_url, config.management_url,
                                     timeout=min(1.0, timeout))

    def close(self) -> None:
        close_quietly(self._publisher)
        close_quietly(self.connection)

    def _size(self, queue: str) -> int:
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

    def dead_letter_count(self, queue: str) -> int:
        return self._size(topology.dead_letter_queue_name(queue))

    def _read(self, channel: Any, queue: str, limit: int) -> Iterator[Delivery]:
        """The first ``limit`` messages of ``queue``, one at a time, held unacked."""
        arrived: deque[Delivery] = deque()
        tag = channel.basic_consume(
            queue, no_ack=False, callback=lambda message: arrived.append(delivery(message, queue))
        )
        try:
            for _ in range(limit):
                deadline = time.monotonic() + self.timeout
                while not arrived:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise BrokerError(f"reading {queue} timed out after {self.timeout:g}s")
                    self.connection.drain_events(timeout=remaining)
                yield arrived.popleft()
        finally:
            if channel.is_open:
                # Stop the flow before closing: deliveries that meet a closing channel are
                # only noise in the log. Those still coming are dropped here, unacked.
                channel.basic_cancel(tag)
                arrived.clear()

    def dead_letters(self, queue: str) -> Iterator[DeadLetter]:
        work = queue
        dlq = topology.dead_letter_queue_name(work)
        total = self._size(dlq)
        channel = plain_channel(self.connection)
        try:
            for received in self._read(channel, dlq, total):
                yield letters.read_dead_letter(received, work)
        finally:
            if channel.is_open:
                channel.close()  # everything read goes back, in place

    def replay(
        self,
        queue: str,
        wanted: Callable[[DeadLetter], bool],
        rebuild: Callable[[DeadLetter], tuple[Envelope, str]],
    ) -> Iterator[tuple[DeadLetter, str]]:
        work = queue
        dlq = topology.dead_letter_queue_name(work)
        total = self._size(dlq)
        reader = plain_channel(self.connection)
        if self._publisher is None:
            self._publisher = self.connector.connect_once(
                timeout=self.timeout, name="taskq admin replay"
            )
        confirms = ConfirmChannel(self._publisher)
        #: Copies published, not yet confirmed: (their sequence number, the original's tag).
        window: list[tuple[int, Any, DeadLetter, str]] = []
        try:
            for received in self._read(reader, dlq, total):
                letter = letters.read_dead_letter(received, work)
                if not wanted(letter):
                    continue
                envelope, note = rebuild(letter)
                if envelope.queue not in self.declared:
                    topology.declare_work_queue(
                        self._publisher, envelope.queue,
                        self.connector.config.max_priority_for(envelope.queue))
                    self.declared.add(envelope.queue)
                window.append((confirms.send_routed(envelope, self.declared), received.tag,
                               letter, note))
                if len(window) >= REPLAY_WINDOW:
                    yield from self._settle(reader, confirms, window)
            yield from self._settle(reader, confirms, window)
        finally:
            if reader.is_open:
                reader.close()

    def _settle(
        self, reader: Any, confirms: ConfirmChannel, window: list[tuple[int, Any, DeadLetter, str]]
    ) -> Iterator[tuple[DeadLetter, str]]:
        """Wait for the window's confirms; ack each original whose copy the broker took."""
        if not window:
            return
        confirms.wait_until(window[-1][0], time.monotonic() + self.timeout)
        for seq, tag, letter, note in window:
            reason = confirms.refusal(seq, letter.ref.correlation_id)
            if reason:
                raise BrokerError(f"the broker did not take {letter.id} back: {reason}")
            reader.basic_ack(tag)
            yield letter, note
        window.clear()

    def purge(self, queue: str) -> int:
        dlq = topology.dead_letter_queue_name(queue)
        self._size(dlq)
        channel = self.connection.channel()
        try:
            return int(channel.queue_purge(dlq) or 0)
        finally:
            channel.close()

    def _peek(self, queue: str) -> tuple[int, int] | None:
        """(ready, consumers) of ``queue``, or None if there is no such queue."""
        channel = self.connection.channel()
        try:
            _, count, consumers = channel.queue_declare(queue, passive=True)
        except amqp_errors.NotFound:
            return None
        finally:
            if channel.is_open:
                channel.close()
        return int(count), int(consumers)

    def known_queues(self) -> list[str]:
        """The vhost's work queues, where the management plugin answers (AMQP can't list)."""
        listed = self.management.queues() or {}
        return sorted(name for name in listed if is_work_queue(name))

    def queue_stats(self, queues: Iterable[str]) -> list[QueueStats]:
        # AMQP tells a queue's ready messages and consumers; the unacked count comes from the
        # management plugin where it answers (its figures lag by its stats interval).
        listed = self.management.queues() or {}
        found = []
        for queue in dict.fromkeys(queues):
            seen = self._peek(queue)
            if seen is None:
                continue
            dead = self._peek(topology.dead_letter_queue_name(queue))
            unacked = (listed.get(queue) or {}).get("messages_unacknowledged")
            found.append(QueueStats(queue, seen[0],
                                    int(unacked) if isinstance(unacked, int) else None,
                                    seen[1], dead[0] if dead is not None else 0))
        return found
