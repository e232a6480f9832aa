"""Counting runs cut short by the death of their process, on classic queues that count nothing.

RabbitMQ's ``redelivered`` flag can't be the count: after a crash the broker marks every
message it recovers from disk as redelivered, including ones never delivered to anyone, so
counting the flag buries a backlog that never ran after a few broker crashes. taskq counts
what it knows instead: whoever sees a run die records it here, before the broker can hand the
message to anyone else:

* the slot, when the executor child running a time-limited task dies;
* the worker's supervisor, when a slot process dies running a task (it keeps the slot's
  connection open until it has recorded it: see :mod:`taskq.broker.amqp.support`);
* the next worker started on the same machine, when a whole worker died
  (:mod:`taskq.broker.amqp.journal`).

A lost run is one persistent message in a durable queue named after the task's id and retry
count (``taskq.lost.<id>.<retries>``); its depth is the count. A slot looks it up only for a
message the broker flags as redelivered, and deletes it once the message is settled. The
queue expires after :data:`EXPIRES` unused (a message that long in its queue starts counting
afresh). Messages from taskq 0.1 carry their count in a header; both are added.
"""

from __future__ import annotations

import hashlib
from typing import Any

from amqp import exceptions as amqp_errors

from ...message import Delivery, Envelope
from .channel import ConfirmChannel

PREFIX = "taskq.lost."
#: A lost-run count unused this long is deleted by the broker (seconds). A poison message
#: comes back at once (it keeps its place at the head of its queue), so a day is plenty.
EXPIRES = 24 * 3600.0


def key(delivery: Delivery) -> str | None:
    """The count's queue name for this message, or None if it names no task."""
    task_id = delivery.task_id
    if not task_id:
        return None
    retries = delivery.headers.get("retries") or 0
    name = f"{PREFIX}{task_id}.{retries}"
    if len(name.encode("utf-8", "surrogatepass")) > 255:  # AMQP's limit for a queue name
        name = PREFIX + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
    return name


def record(confirms: ConfirmChannel, name: str, deadline: float) -> None:
    """Add one lost run to the count ``name``; return once the broker has stored it."""
    confirms.channel.queue_declare(
        name, durable=True, auto_delete=False, arguments={"x-expires": int(EXPIRES * 1000)}
    )
    mark = Envelope(queue=name, body=b"", content_type=None, headers={}, correlation_id=name)
    seq = confirms.send_envelope(mark)
    confirms.wait_until(seq, deadline)
    reason = confirms.refusal(seq, name)
    if reason:
        raise amqp_errors.RecoverableChannelError(f"could not record a lost run: {reason}")


class Counts:
    """Looking counts up and deleting them, on a channel of its own (a lookup of a count that
    does not exist closes its channel: the broker answers a passive declare with 404)."""

    def __init__(self, connection: Any) -> None:
        self._connection = connection
        self._channel: Any = None

    def _open(self) -> Any:
        if self._channel is None or not self._channel.is_open:
            self._channel = self._connection.channel()
        return self._channel

    def count(self, name: str) -> int:
        try:
            _, messages, _ = self._open().queue_declare(name, passive=True)
        except amqp_errors.NotFound:
            self._channel = None
            return 0
        return int(messages)

    def forget(self, name: str) -> None:
        self._open().queue_delete(name, nowait=True)
