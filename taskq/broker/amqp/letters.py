"""Dead letters on RabbitMQ: a copy of the message in ``<queue>.dlq``, the reason in headers.

Each is a fresh publish of the same body, never a broker-side dead-lettering: that is how taskq
keeps a reason with a dead letter (RabbitMQ's own ``x-death`` only says "rejected").
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from ...copies import copy_of, protocol_headers
from ...message import DELIVERY_COUNT_HEADER, Delivery, Envelope
from ..base import DeadLetter
from .channel import message_properties
from .frames import UNDECODABLE
from .properties import encode_properties
from .topology import dead_letter_queue_name, home_queue

DEAD_REASON = "x-taskq-dead-reason"
DEAD_EXCEPTION = "x-taskq-dead-exception"
DEAD_AT = "x-taskq-dead-at"
DEAD_QUEUE = "x-taskq-original-queue"
DEAD_WORKER = "x-taskq-dead-worker"


def delivery_count(delivery: Delivery) -> int:
    """Lost runs recorded in the message itself (by this version or an older one)."""
    try:
        return max(0, int(delivery.headers.get(DELIVERY_COUNT_HEADER) or 0))
    except (TypeError, ValueError):
        return 0


#: Longest reason kept with a dead letter, in characters.
MAX_REASON = 2000
#: Header values longer than this are clipped when a dead letter would not fit in a frame.
CLIPPED_VALUE = 1024
DROPPED = "x-taskq-dropped-headers"


def dead_letter(
    delivery: Delivery, exc_type: str, reason: str, worker: str, max_properties: int = 131_000
) -> Envelope:
    """The message as it came, plus why it could not be processed, for ``<queue>.dlq``.

    Keeps the body byte for byte and every property as it came (bytes that are not UTF-8
    included); the headers too, unless with the reason they would not fit in one frame
    (``max_properties`` bytes): then long values are clipped, and if that is not enough only
    the reason and the task's id and name are kept, with the names of the rest.
    """
    props = delivery.properties
    raw_reason = reason if len(reason) <= MAX_REASON else reason[:MAX_REASON] + " [...]"
    if props.get(UNDECODABLE):
        raw_reason += f" (its headers could not be read: {props[UNDECODABLE]})"
    dead = {
        DEAD_REASON: raw_reason,
        DEAD_EXCEPTION: exc_type[:200],
        DEAD_AT: datetime.now(timezone.utc).isoformat(),
        DEAD_QUEUE: home_queue(delivery.queue, delivery.headers),
        DEAD_WORKER: worker,
    }
    kept = protocol_headers(delivery.headers)
    envelope = _raw_copy(delivery, dead_letter_queue_name(dead[DEAD_QUEUE]), {**kept, **dead})
    if _fits(envelope, max_properties):
        return envelope
    envelope.headers = {**{k: _clip(v) for k, v in kept.items()}, **dead}
    if _fits(envelope, max_properties):
        return envelope
    essentials: dict[str, Any] = {k: _clip(kept[k]) for k in ("id", "task") if k in kept}
    dropped = [k for k in kept if k not in essentials]
    envelope.headers = {**essentials, **dead, DROPPED: _clip(", ".join(dropped))}
    if not _fits(envelope, max_properties):  # even the properties alone are too big
        envelope.headers = dead
    return envelope


def _raw_copy(delivery: Delivery, queue: str, headers: dict[str, Any]) -> Envelope:
    """A copy with the properties as they came: bytes where they were not UTF-8."""
    props = delivery.properties
    envelope = copy_of(delivery, queue, headers)
    raw: Any = props
    envelope.content_type = raw.get("content_type", envelope.content_type)
    envelope.content_encoding = raw.get("content_encoding", envelope.content_encoding)
    envelope.correlation_id = raw.get("correlation_id", envelope.correlation_id)
    envelope.reply_to = raw.get("reply_to", envelope.reply_to)
    return envelope


def _clip(value: Any) -> Any:
    if isinstance(value, str) and len(value) > CLIPPED_VALUE:
        return value[:CLIPPED_VALUE] + " [...]"
    if isinstance(value, bytes) and len(value) > CLIPPED_VALUE:
        return value[:CLIPPED_VALUE] + b" [...]"
    if isinstance(value, (dict, list, tuple)):
        text = repr(value)
        return text if len(text) <= CLIPPED_VALUE else text[:CLIPPED_VALUE] + " [...]"
    return value


def _fits(envelope: Envelope, max_properties: int) -> bool:
    try:
        encoded = encode_properties(
            message_properties(
                envelope.content_type,
                envelope.headers,
                envelope.correlation_id,
                envelope.reply_to,
                content_encoding=envelope.content_encoding,
                priority=envelope.priority,
            )
        )
    except Exception:  # a value the encoder can't carry: clipping turns it into text
        return False
    return len(encoded) <= max_properties


def counted_copy(delivery: Delivery, count: int) -> Envelope:
    """The same message, recording that ``count`` deliveries of it were lost."""
    headers = protocol_headers(delivery.headers)
    headers[DELIVERY_COUNT_HEADER] = count
    return copy_of(delivery, delivery.queue, headers)


def read_dead_letter(delivery: Delivery, queue: str) -> DeadLetter:
    """A message read from ``<queue>.dlq`` as taskq's view of a dead letter."""
    h = delivery.headers
    exception, reason = str(h.get(DEAD_EXCEPTION, "?")), h.get(DEAD_REASON)
    dead_at = str(h.get(DEAD_AT, "?"))
    if reason is None and h.get("x-first-death-reason"):  # the broker's own dead-lettering
        why = str(h["x-first-death-reason"])
        exception = why
        deaths = h.get("x-death")
        if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
            when = deaths[0].get("time")
            dead_at = when.isoformat() if isinstance(when, datetime) else dead_at
        reason = f"the broker dead-lettered it from {h.get('x-first-death-queue', queue)} ({why})"
        if why == "expired":
            reason += ": its per-message expiration passed before a worker took it"
    return DeadLetter(
        id=delivery.task_id or "?",
        task=delivery.task_name or "?",
        exception=exception,
        reason=str(reason or "(no reason recorded)"),
        dead_at=dead_at,
        original_queue=str(h.get(DEAD_QUEUE) or queue),
        worker=str(h.get(DEAD_WORKER, "?")),
        body=delivery.body,
        content_type=delivery.content_type,
        headers=h,
        reply_to=delivery.reply_to,
        ref=delivery,
    )


def is_consumer_timeout(exc: BaseException) -> bool:
    """RabbitMQ's consumer_timeout closes the channel with 406 'delivery acknowledgement ...
    timed out'."""
    text = str(exc).lower()
    return "acknowledgement" in text and "timed out" in text
