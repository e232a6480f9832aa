"""Messages derived from one that was received: a retry, a message not due yet, a replay.

Each is a fresh message with the same body and id; only the protocol headers change (Celery's
``retries`` and ``eta``). Headers whose names start with ``x-`` or ``taskq-`` belong to
brokers and to taskq's bookkeeping (dead-letter reasons, broker histories, delay routing): a
copy starts without them, and the broker adds what it needs when it stores the copy.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from .message import Delivery, Envelope, parse_time


def protocol_headers(headers: dict[Any, Any]) -> dict[str, Any]:
    """The headers a copy keeps: string keys, none of a broker's or taskq's own."""
    return {
        key: value
        for key, value in headers.items()
        if isinstance(key, str) and not key.startswith(("x-", "taskq-"))
    }


def copy_of(
    delivery: Delivery, queue: str, headers: dict[str, Any], delay: float = 0.0
) -> Envelope:
    """The delivered message as a new one for ``queue``, with ``headers``."""
    encoding = delivery.properties.get("content_encoding")
    priority = delivery.properties.get("priority")
    return Envelope(
        queue=queue,
        body=delivery.body,
        content_type=delivery.content_type,
        headers=headers,
        correlation_id=delivery.correlation_id,
        reply_to=delivery.reply_to,
        delay=delay,
        content_encoding=encoding if isinstance(encoding, str) else None,
        priority=priority if isinstance(priority, int) and priority > 0 else None,
    )


def retry(delivery: Delivery, countdown: float) -> Envelope:
    """The next attempt: ``retries`` + 1, due ``countdown`` seconds from now (Celery's way)."""
    headers = protocol_headers(delivery.headers)
    headers["retries"] = int(headers.get("retries") or 0) + 1
    countdown = max(0.0, countdown)
    if countdown > 0:
        headers["eta"] = (datetime.now(timezone.utc) + timedelta(seconds=countdown)).isoformat()
    else:
        headers.pop("eta", None)
    return copy_of(delivery, delivery.queue, headers, delay=countdown)


def delayed(delivery: Delivery, seconds: float) -> Envelope:
    """The same message, to be delivered ``seconds`` from now (it arrived before its ETA)."""
    return copy_of(delivery, delivery.queue, protocol_headers(delivery.headers), delay=seconds)


def replayed(
    body: bytes,
    content_type: str | None,
    headers: dict[Any, Any],
    correlation_id: str | None,
    reply_to: str | None,
    queue: str,
) -> tuple[Envelope, str]:
    """A dead letter sent back to ``queue`` to run again, as it was first sent.

    An expired letter would only expire again: its ``expires`` is cleared (and said so in
    the second value, a note for the user; "" when nothing changed).
    """
    kept = protocol_headers(headers)
    note = ""
    if _past(kept.get("expires")):
        del kept["expires"]
        note = "its expiry had passed and was cleared, so that it runs"
    envelope = Envelope(
        queue=queue,
        body=body,
        content_type=content_type,
        headers=kept,
        correlation_id=correlation_id,
        reply_to=reply_to,
    )
    return envelope, note


def _past(value: Any) -> bool:
    if value is None:
        return False
    try:
        moment = parse_time(value)
    except (TypeError, ValueError):
        return True  # unreadable: it would be refused again
    return moment is not None and moment <= datetime.now(timezone.utc)
