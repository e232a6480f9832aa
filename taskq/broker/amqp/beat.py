"""A scheduler's link to RabbitMQ (:class:`~taskq.broker.base.BeatLink`): one connection.

* Who is active: the beat that holds the exclusive queue ``taskq.beat.<schedule>.lock``,
  declared on its connection. Another connection's declare is refused (RESOURCE_LOCKED):
  that beat stands by and tries again. RabbitMQ deletes the queue as soon as its holder's
  connection closes, which the kernel does when the process dies (kill -9 included); a
  holder cut off by the network keeps it until the broker misses its heartbeats (and can't
  fire meanwhile: its publishes go on that connection).
* What was fired: per entry a durable queue ``taskq.beat.<schedule>.last.<entry>`` that
  holds one message (``x-max-length`` 1, overflow drop-head): the latest due time handled,
  in the header ``x-taskq-beat-due``. It is read by taking its messages without acking them
  and closing the channel (they go back); if a reader held it at that moment the next
  publish may leave two, so a reader takes the largest due time it finds.
* A fire is one publish, confirmed: the task message goes to its queue with the record queue
  in its ``BCC`` header (RabbitMQ's sender-selected distribution: a second routing key,
  removed before delivery), so the task message and the record are stored together or not
  at all, and the record is a copy of the last task message fired. A message that can't go
  that way (delayed, or sent by routing key or as a broadcast: BCC would be routed by their
  exchange) is published first and recorded after; killed in between, the next active beat
  fires it again, under the same task id and marked ``once``: the workers run one copy (see
  :mod:`.flows`).

Everything goes over a :class:`~.client.ClientConnection`, as ``.delay()``'s messages do;
the lock is on that same connection, so a fire can only be stored while its beat leads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from amqp import exceptions as amqp_errors

from ...errors import BrokerError, DeclarationConflict
from ...message import Envelope
from ..base import BeatLink
from .connection import bound
from .consumer import plain_channel
from .topology import conflict_message

if TYPE_CHECKING:
    from . import AmqpBroker

log = logging.getLogger("taskq.beat")

#: A record queue found empty is read again this many times, this far apart: a reader
#: (``taskq beat --list``) may hold its one message for a moment.
EMPTY_RETRIES, EMPTY_PAUSE = 3, 0.2
RECORD_ARGUMENTS = {"x-max-length": 1, "x-overflow": "drop-head"}
#: The header of a record (and of a task message fired with one): the due time, in seconds.
RECORD_HEADER = "x-taskq-beat-due"


def _named(prefix: str, name: str) -> str:
    """``prefix + name``, with a digest for a name too long for a queue (255 bytes)."""
    full = prefix + name
    if len(full.encode()) <= 200:
        return full
    return prefix + hashlib.sha256(name.encode()).hexdigest()[:40]


def lock_queue_name(schedule: str) -> str:
    return _named("taskq.beat.", schedule) + ".lock"


def record_queue_name(schedule: str, entry: str) -> str:
    return _named(f"{_named('taskq.beat.', schedule)}.last.", entry)


class AmqpBeatLink(BeatLink):
    def __init__(self, broker: AmqpBroker, timeout: float) -> None:
        self.timeout = timeout
        self.client = broker.client_link(timeout=timeout, name="taskq beat")
        self.connection = self.client.connection
        self.tick_interval = self.client.tick_interval
        self._leading: set[str] = set()

    def _deadline(self) -> float:
        return time.monotonic() + self.timeout

    def lead(self, schedule: str) -> bool:
        if schedule in self._leading:
            return True
        with bound(self.connection).until(self._deadline()):
            channel = self.connection.channel()
            try:
                channel.queue_declare(queue=lock_queue_name(schedule), durable=False,
                                      exclusive=True, auto_delete=False)
            except amqp_errors.ResourceLocked:
                return False  # another beat's connection holds it
            finally:
                # py-amqp reopens a channel the broker closed: close it, or a standby
                # retrying twice a second runs out of channel ids within the hour.
                if channel.is_open:
                    channel.close()
        self._leading.add(schedule)
        return True

    def last_fired(self, schedule: str, entries: Sequence[str]) -> dict[str, float]:
        found: dict[str, float] = {}
        with bound(self.connection).until(self._deadline()):
            for entry in entries:
                due = self._read(record_queue_name(schedule, entry))
                if due is not None:
                    found[entry] = due
        return found

    def _read(self, queue: str) -> float | None:
        for attempt in range(EMPTY_RETRIES + 1):
            if attempt:
                time.sleep(EMPTY_PAUSE)
            channel = plain_channel(self.connection)
            dues: list[float] = []
            try:
                try:
                    channel.queue_declare(queue=queue, passive=True)
                except amqp_errors.NotFound:
                    return None  # never recorded (the broker closed the channel)
                while (message := channel.basic_get(queue, no_ack=False)) is not None:
                    dues.extend(_due_of(message, queue))
            finally:
                if channel.is_open:
                    channel.close()  # what it took goes back
            if dues:
                return max(dues)
        return None

    def fire(self, schedule: str, entry: str, due: float, envelope: Envelope | None) -> None:
        deadline = self._deadline()
        queue = record_queue_name(schedule, entry)
        with bound(self.connection).until(deadline):
            # Declared for each fire, as the task's queue below: a publish that BCCs a queue
            # deleted meanwhile would store the task message without its record.
            self._declare(queue)
        if envelope is None:
            self._record(queue, schedule, entry, due, deadline)
        elif envelope.routing_key is None and not envelope.broadcast and envelope.delay <= 0:
            # The task's queue deleted meanwhile would not make this publish come back (the
            # record queue takes it): the task would be lost unseen. So declared each time.
            self.client.declared.discard(envelope.queue)
            headers = {**envelope.headers, RECORD_HEADER: due, "BCC": [queue]}
            self.client.publish(dataclasses.replace(envelope, headers=headers, once=False),
                                deadline)
        else:
            self.client.publish(envelope, deadline)
            self._record(queue, schedule, entry, due, deadline)

    def _record(self, queue: str, schedule: str, entry: str, due: float,
                deadline: float) -> None:
        """Publish a record of ``due`` alone (confirmed)."""
        body = json.dumps({"schedule": schedule, "entry": entry, "due": due}).encode()
        confirms = self.client.channel
        with bound(self.connection).until(deadline):
            seq = confirms.send(body, {"delivery_mode": 2, "content_type": "application/json",
                                       "correlation_id": queue,
                                       "application_headers": {RECORD_HEADER: due}},
                                "", queue, queue)
            confirms.wait_until(seq, deadline)
        refused = confirms.refusal(seq, queue)
        if refused:
            raise BrokerError(f"the broker did not record the fire of {entry!r}: {refused}")

    def _declare(self, queue: str) -> None:
        channel = self.connection.channel()  # of its own: a refusal closes it
        try:
            channel.queue_declare(queue=queue, durable=True, exclusive=False,
                                  auto_delete=False, arguments=RECORD_ARGUMENTS)
        except amqp_errors.PreconditionFailed as exc:
            raise DeclarationConflict(conflict_message(queue, exc.reply_text or str(exc))) \
                from exc
        finally:
            if channel.is_open:
                channel.close()

    def tick(self) -> None:
        self.client.drain()
        self.client.tick()

    def close(self) -> None:
        self.client.close()  # the lock queue goes with the connection


def _due_of(message: Any, queue: str) -> list[float]:
    due = (message.properties.get("application_headers") or {}).get(RECORD_HEADER)
    if isinstance(due, (int, float)) and not isinstance(due, bool):
        return [float(due)]
    log.warning("ignoring a message in %s that is not a beat record (no %s header)", queue,
                RECORD_HEADER)
    return []
