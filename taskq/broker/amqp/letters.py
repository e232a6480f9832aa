"""Dead letters on RabbitMQ: a copy of the message in ``<queue>.dlq``, the reason in headers.

Each is a fresh publish of the same body, never a broker-side dead-lettering: that is how taskq
keeps a reason with a dead letter (RabbitMQ's own ``x-death`` only says "rejected").
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from ...copies import protocol_headers
from ...message import DELIVERY_COUNT_HEADER, Delivery, Envelope
from ..base import DeadLetter
from .topology import dead_letter_queue_name

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


def _copy(delivery: Delivery, queue: str, headers: dict[str, Any]) -> Envelope:
    encoding = delivery.properties.get("content_encoding")
    return Envelope(
        queue=queue,
        body=delivery.body,
        content_type=delivery.content_type,
        headers=headers,
        correlation_id=delivery.correlation_id,
        reply_to=delivery.reply_to,
        content_encoding=encoding if isinstance(encoding, str) else None,
    )


def dead_letter(delivery: Delivery, exc_type: str, reason: str, worker: str) -> Envelope:
    """The message as it came, plus why it could not be processed, for ``<queue>.dlq``."""
    headers = protocol_headers(delivery.headers)
    headers.update(
        {
            DEAD_REASON: reason,
            DEAD_EXCEPTION: exc_type,
            DEAD_AT: datetime.now(timezone.utc).isoformat(),
            DEAD_QUEUE: delivery.queue,
            DEAD_WORKER: worker,
        }
    )
    return _copy(delivery, dead_letter_queue_name(delivery.queue), headers)


def counted_copy(delivery: Delivery, count: int) -> Envelope:
    """The same message, recording that ``count`` deliveries of it were lost."""
    headers = protocol_headers(delivery.headers)
    headers[DELIVERY_COUNT_HEADER] = count
    return _copy(delivery, delivery.queue, headers)


def read_dead_letter(delivery: Delivery, queue: str) -> DeadLetter:
    """A message read from ``<queue>.dlq`` as taskq's view of a dead letter."""
    h = delivery.headers
    return DeadLetter(
        id=delivery.task_id or "?",
        task=delivery.task_name or "?",
        exception=str(h.get(DEAD_EXCEPTION, "?")),
        reason=str(h.get(DEAD_REASON, "(no reason recorded)")),
        dead_at=str(h.get(DEAD_AT, "?")),
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
