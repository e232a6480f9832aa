"""Messages a worker derives from one it received: dead letters, retries, counted copies.

Each is a fresh publish of the same body, never a broker-side requeue: that is how taskq keeps
a reason with a dead letter and a delivery count on classic queues, which carry neither.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from ..broker.amqp.topology import dead_letter_queue_name
from ..message import DELIVERY_COUNT_HEADER, Delivery, Envelope

DEAD_REASON = "x-taskq-dead-reason"
DEAD_EXCEPTION = "x-taskq-dead-exception"
DEAD_AT = "x-taskq-dead-at"
DEAD_QUEUE = "x-taskq-original-queue"
DEAD_WORKER = "x-taskq-dead-worker"
DEAD_HEADERS = (DEAD_REASON, DEAD_EXCEPTION, DEAD_AT, DEAD_QUEUE, DEAD_WORKER)


def clean_headers(headers: dict[str, Any]) -> dict[str, Any]:
    """Headers for a re-publish: without the broker's dead-letter history.

    RabbitMQ drops a message whose ``x-death`` shows it already passed through a queue it
    would dead-letter into again (cycle detection), so a copy must not carry it.
    """
    return {
        key: value
        for key, value in headers.items()
        if not key.startswith(("x-death", "x-first-death", "x-last-death"))
        and key not in DEAD_HEADERS
    }


def delivery_count(delivery: Delivery) -> int:
    try:
        return max(0, int(delivery.headers.get(DELIVERY_COUNT_HEADER) or 0))
    except (TypeError, ValueError):
        return 0


def _copy(delivery: Delivery, queue: str, headers: dict[str, Any], delay: float = 0.0) -> Envelope:
    return Envelope(
        queue=queue,
        body=delivery.body,
        content_type=delivery.content_type,
        headers=headers,
        correlation_id=delivery.correlation_id,
        reply_to=delivery.reply_to,
        delay=delay,
        content_encoding=delivery.properties.get("content_encoding"),
    )


def dead_letter(delivery: Delivery, exc_type: str, reason: str, worker: str) -> Envelope:
    """The message as it came, plus why it could not be processed, for ``<queue>.dlq``."""
    headers = clean_headers(delivery.headers)
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
    headers = clean_headers(delivery.headers)
    headers[DELIVERY_COUNT_HEADER] = count
    return _copy(delivery, delivery.queue, headers)


def retry(delivery: Delivery, countdown: float) -> Envelope:
    """The next attempt: ``retries`` + 1, due ``countdown`` seconds from now (Celery's way)."""
    headers = clean_headers(delivery.headers)
    headers.pop(DELIVERY_COUNT_HEADER, None)
    headers["retries"] = int(headers.get("retries") or 0) + 1
    countdown = max(0.0, countdown)
    headers["eta"] = (
        (datetime.now(timezone.utc) + timedelta(seconds=countdown)).isoformat()
        if countdown > 0
        else None
    )
    return _copy(delivery, delivery.queue, headers, delay=countdown)


def delayed(delivery: Delivery, seconds: float) -> Envelope:
    """The same message, to be delivered ``seconds`` from now (it arrived before its ETA)."""
    return _copy(delivery, delivery.queue, clean_headers(delivery.headers), delay=seconds)


def replay(delivery: Delivery, queue: str) -> Envelope:
    """A dead letter sent back to its queue to run again, as it was first sent."""
    headers = clean_headers(delivery.headers)
    headers.pop(DELIVERY_COUNT_HEADER, None)
    return _copy(delivery, queue, headers)


def is_consumer_timeout(exc: BaseException) -> bool:
    """RabbitMQ's consumer_timeout closes the channel with 406 'delivery acknowledgement ...
    timed out'."""
    text = str(exc).lower()
    return "acknowledgement" in text and "timed out" in text
