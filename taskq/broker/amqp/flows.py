"""Workflows on RabbitMQ: one run per workflow message, and chord joins in the broker.

RabbitMQ can't store a message and ack another in one step, so a slot killed between
storing a workflow's next message (a chain's next step, a chord's callback) and acking the
one it ran leaves a copy behind: the message runs again and stores the next one again, under
the same task id. So each such message carries a random mark (``x-taskq-once``), and before
one runs, its slot claims its task id in the broker:

* ``taskq.once.<key>``: a queue of at most one message that refuses the next
  (``reject-publish``), holding the latest claim: a place and a mark; read and written only
  under the key's lock, ``taskq.once.<key>.lock`` (see :meth:`Claims.is_copy`).
  A chain's steps share one key (the chain's last step's id), each later step a higher
  place; a chord's callback has its own. It expires ``workflow_expires`` after its last use.

A chord's join is a queue of the header results:

* ``taskq.chord.<callback id>``: each header task's slot publishes its result there
  (confirmed, index in a header) before its ack; a rerun adds a duplicate, which the join
  ignores. Once the queue holds at least as many results as the chord has tasks, the slot
  reads them all under a lock (an exclusive queue, ``taskq.chord.<id>.lock``, which the
  broker drops with its connection if the process dies), and if every index is there,
  returns them: the slot stores the callback (marked, as above) and then deletes the queue.

No join is missed: a slot that finds the lock taken leaves, and the holder, once it has
put the results back and dropped the lock, counts again and reads again if more came.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections import OrderedDict
from typing import Any

from amqp import exceptions as amqp_errors

from ...message import Delivery, Envelope
from ..base import Join
from .channel import ConfirmChannel

#: The header carrying a workflow message's mark.
ONCE_HEADER = "x-taskq-once"


def _name(prefix: str, key: str) -> str:
    name = f"{prefix}.{key}"
    if len(name.encode()) > 200:  # a queue name is at most 255 bytes
        name = f"{prefix}.{hashlib.sha256(key.encode()).hexdigest()}"
    return name


def once_queue_name(task_id: str) -> str:
    return _name("taskq.once", task_id)


def chord_queue_name(chord: str) -> str:
    return _name("taskq.chord", chord)


def marked(envelope: Envelope) -> Envelope:
    """The envelope with a mark of its own, if it is a workflow's (``once``) message: the
    key its run is claimed under, its place there, and a random mark."""
    if not envelope.once:
        return envelope
    key, place = envelope.once_scope or (envelope.task_id, 0)
    mark = [key, place, os.urandom(12).hex()]
    return dataclasses.replace(envelope, headers={**envelope.headers, ONCE_HEADER: mark})


class Claims:
    """The run claims of one publishing connection (see :meth:`is_copy`): a channel kept for
    them, and the claim queues it has declared."""

    #: Claim queues remembered as declared (a chain's later steps claim in the same one).
    REMEMBERED = 4096

    def __init__(self, connection: Any, confirms: ConfirmChannel, expires: float) -> None:
        self.connection = connection
        self.confirms = confirms
        self.expires = expires
        self._channel: Any = None
        self._declared: OrderedDict[str, None] = OrderedDict()

    def is_copy(self, delivery: Delivery, deadline: float) -> bool:
        """Whether ``delivery`` is a copy of a workflow message that must not run: another
        copy of it claimed the run, or a later message of its chain did. Otherwise claims
        the run.

        The claim queue holds at most one message, ``[place, mark]``: the latest claim under
        its key. Who looks at it holds the key's lock: an exclusive consumer on
        ``<claim queue>.lock`` (the broker refuses a second one, and drops it with a dead
        process's connection), so no copy ever finds the claim queue empty while another
        holds the claim. Our own mark
        means this copy was delivered again after its slot died (it runs); another mark at
        our place or later means it must not; an earlier place (the step before) is
        replaced by ours.
        """
        claim = _claim_of(delivery.headers.get(ONCE_HEADER))
        if claim is None:
            return False
        key, place, mark = claim
        name = once_queue_name(key)
        lock = f"{name}.lock"
        if name not in self._declared:
            arguments = {"x-expires": round(self.expires * 1000)}
            _declare(self.connection, name, {**arguments, "x-max-length": 1,
                                             "x-overflow": "reject-publish"})
            _declare(self.connection, lock, arguments)
            self._declared[name] = None
            while len(self._declared) > self.REMEMBERED:
                self._declared.popitem(last=False)
        while True:
            channel = self._open()
            try:
                tag = channel.basic_consume(lock, callback=_never, exclusive=True)
            except (amqp_errors.AccessRefused, amqp_errors.ResourceLocked,
                    amqp_errors.NotFound) as exc:
                self._channel = None  # the broker closed it
                if isinstance(exc, amqp_errors.NotFound):  # expired since we declared it
                    self._declared.pop(name, None)
                    return self.is_copy(delivery, deadline)
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"could not claim the run of workflow message {key}") from None
                time.sleep(0.002)  # another copy's slot holds the claim for a moment
                continue
            try:
                kept = channel.basic_get(name, no_ack=False)
                return _decide(self.confirms, channel, name, kept, place, mark, deadline)
            except BaseException:
                self._drop()  # closing it gives back what we held, and the lock
                raise
            finally:
                if self._channel is not None:
                    channel.basic_cancel(tag)  # the lock goes

    def _open(self) -> Any:
        if self._channel is None or not self._channel.is_open:
            self._channel = self.connection.channel()
            self._channel.auto_decode = False
        return self._channel

    def _drop(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None and channel.is_open:
            channel.close()


def _never(message: Any) -> None:
    """Nothing is ever published to a lock queue: its exclusive consumer is the lock."""


def _claim_of(header: Any) -> tuple[str, int, str] | None:
    """``(key, place, mark)`` from the header; None if there is none, or it is not ours."""
    try:
        key, place, mark = header
        return str(key), int(place), str(mark)
    except (TypeError, ValueError):
        return None


def _decide(confirms: ConfirmChannel, channel: Any, name: str, kept: Any, place: int,
            mark: str, deadline: float) -> bool:
    if kept is not None:
        try:
            kept_place, kept_mark = json.loads(bytes(kept.body))
        except (ValueError, TypeError):
            kept_place, kept_mark = None, None  # not a claim: replaced by ours
        if kept_mark == mark or (isinstance(kept_place, int) and kept_place >= place):
            channel.basic_reject(kept.delivery_tag, requeue=True)
            # our own claim: this copy was delivered again after its slot died, it runs
            return bool(kept_mark != mark)
        channel.basic_ack(kept.delivery_tag)
    seq = confirms.send(json.dumps([place, mark]).encode(), {"delivery_mode": 2}, "", name,
                        None)
    confirms.wait_until(seq, deadline)
    refused = confirms.refusal(seq, None)
    if refused:
        raise amqp_errors.RecoverableChannelError(f"run claim not stored: {refused}")
    return False


def _declare(connection: Any, name: str, arguments: dict[str, Any]) -> None:
    """Declare a workflow queue; one that exists with other arguments (another app's
    ``workflow_expires``) is used as it is."""
    channel = connection.channel()
    try:
        channel.queue_declare(queue=name, durable=True, exclusive=False, auto_delete=False,
                              arguments=arguments)
    except amqp_errors.PreconditionFailed:
        pass  # the broker closed that channel
    finally:
        if channel.is_open:
            channel.close()


def join(connection: Any, confirms: ConfirmChannel, part: Join, expires: float,
         deadline: float) -> list[bytes] | None:
    """Add a chord's part; every part in order if the chord is complete now, else None."""
    name = chord_queue_name(part.chord)
    _declare(connection, name, {"x-expires": round(expires * 1000)})
    properties = {"delivery_mode": 2, "application_headers": {"index": part.index}}
    seq = confirms.send(part.part, properties, "", name, None)
    confirms.wait_until(seq, deadline)
    refused = confirms.refusal(seq, None)
    if refused:
        raise amqp_errors.RecoverableChannelError(f"chord part not stored: {refused}")
    count = _count(connection, name)
    while count is not None and count >= part.size:
        read = _read_locked(connection, name, part.size)
        if read is None:
            return None  # another slot reads them: it counts again when done
        parts, seen, count = read
        if parts is not None:
            return parts
        if count is None or count <= seen:
            return None  # nothing came while we read: the missing parts are yet to come
    return None


def forget(confirms: ConfirmChannel, chord: str) -> None:
    """The callback is stored: the join's queue goes."""
    confirms.channel.queue_delete(chord_queue_name(chord))


def _count(connection: Any, name: str, channel: Any = None) -> int | None:
    """How many results the join holds ready (None: it is gone, the callback was stored).
    On a channel of its own, by default: the broker closes the channel that asks about a
    queue it doesn't have."""
    own = channel is None
    channel = connection.channel() if own else channel
    try:
        return int(channel.queue_declare(queue=name, passive=True)[1])
    except amqp_errors.NotFound:
        return None
    finally:
        if own and channel.is_open:
            channel.close()


def _read_locked(
    connection: Any, name: str, size: int
) -> tuple[list[bytes] | None, int, int | None] | None:
    """Under the join's lock: (every part in order, or None if some are missing; how many
    results were read; how many are there after they were put back). None: locked."""
    channel = connection.channel()
    channel.auto_decode = False
    lock = f"{name}.lock"
    try:
        channel.queue_declare(queue=lock, exclusive=True, auto_delete=True)
    except (amqp_errors.ResourceLocked, amqp_errors.AccessRefused):
        return None  # the broker closed that channel
    found: dict[int, bytes] = {}
    seen = 0
    last_tag: int | None = None
    try:
        while (message := channel.basic_get(name, no_ack=False)) is not None:
            seen += 1
            last_tag = message.delivery_tag
            index = (message.properties.get("application_headers") or {}).get("index")
            if isinstance(index, int) and 0 <= index < size:
                found.setdefault(index, bytes(message.body))
        if last_tag is not None:  # all back, before the lock goes (recover-ok says done)
            channel.basic_recover(requeue=True)
        channel.queue_delete(lock)
        count = _count(connection, name, channel)
    except amqp_errors.NotFound:  # deleted meanwhile: the callback was stored
        return None, seen, None
    finally:
        if channel.is_open:
            channel.close()
    parts = [found[i] for i in range(size)] if len(found) == size else None
    return parts, seen, count
