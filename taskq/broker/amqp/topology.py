"""What taskq declares on RabbitMQ, and how a conflicting declaration is reported.

* a work queue per task queue name, durable, whose messages the broker itself dead-letters
  (a per-message ``expiration`` that passes while it waits, as a Celery client's ``expires``
  sets) go to its dead-letter queue instead of vanishing (``x-dead-letter-exchange`` "",
  ``x-dead-letter-routing-key`` ``<queue>.dlq``). A queue that already exists without those
  arguments (made by taskq 0.1, or by a Celery peer) is used as it is, with a warning;
* a dead-letter queue beside each (``<queue>.dlq``), durable: taskq moves messages there
  itself, with the reason in headers, instead of relying on the broker's ``rejected`` reason;
* one reply queue per client process: durable so that results survive a broker restart, with
  ``x-expires`` so that the broker deletes it once its client is gone.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from amqp import exceptions as amqp_errors

from ... import routing
from ...errors import DeclarationConflict

#: The topic exchange of ``apply_async(routing_key=...)``; ``--bind`` binds queues to it.
TOPIC_EXCHANGE = routing.TOPIC_EXCHANGE
TOPIC_MARKER = f"{TOPIC_EXCHANGE}:declared"


def declare_topic_exchange(channel: Any) -> None:
    channel.exchange_declare(TOPIC_EXCHANGE, "topic", durable=True, auto_delete=False)


#: Broadcasts: a fanout exchange per task queue, and a queue per worker bound to the
#: exchanges of the queues it serves; the broker deletes a worker's queue once no one has
#: consumed it for this long (the worker is gone).
BROADCAST_EXPIRES = 60.0
_WORKER_QUEUE = ("taskq.worker.", ".broadcasts")


def broadcast_exchange(queue: str) -> str:
    return f"taskq.broadcast.{queue}"


def broadcast_queue_name(hostname: str) -> str:
    return f"{_WORKER_QUEUE[0]}{hostname}{_WORKER_QUEUE[1]}"


def is_broadcast_queue(queue: str) -> bool:
    return queue.startswith(_WORKER_QUEUE[0]) and queue.endswith(_WORKER_QUEUE[1])


def home_queue(queue: str, headers: dict[Any, Any]) -> str:
    """The queue a message belongs to: for a broadcast in a worker's queue, the queue it was
    broadcast to (its dead letters go there); else the queue it came from."""
    home = headers.get("broadcast")
    if is_broadcast_queue(queue) and isinstance(home, str) and 0 < len(home.encode()) <= 200:
        return home
    return queue


def dead_letter_queue_name(queue: str) -> str:
    return f"{queue}.dlq"


def work_queue_arguments(queue: str, max_priority: int | None = None) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dead_letter_queue_name(queue),
    }
    if max_priority:
        arguments["x-max-priority"] = max_priority
    return arguments


def _declare(channel: Any, name: str, *, arguments: dict[str, Any] | None = None) -> None:
    try:
        channel.queue_declare(
            queue=name, durable=True, exclusive=False, auto_delete=False, arguments=arguments
        )
    except amqp_errors.PreconditionFailed as exc:
        raise DeclarationConflict(conflict_message(name, exc.reply_text or str(exc))) from exc


def conflict_message(queue: str, reply_text: str) -> str:
    """One line naming the queue and the argument that differs, and how to fix it."""
    detail = reply_text.split(" - ", 1)[-1]
    return (
        f"queue {queue!r} already exists with different settings ({detail}); "
        f"delete it (rabbitmqctl delete_queue {queue}) or use another queue name"
    )


#: "inequivalent arg 'x-queue-type' for queue 'q' in vhost 'v': received none but current is
#: the value 'quorum' of type 'longstr'"
_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)'.*but current is (?:none|the value '(?P<current>[^']*)')"
)


def declare_work_queue(connection: Any, queue: str, max_priority: int | None = None) -> str | None:
    """Declare ``queue`` (on a channel of its own: a refusal closes the channel it came on).

    A queue that exists as another type (a quorum queue made by the operator) is declared as
    that type. One that exists without taskq's dead-letter arguments is used without them:
    returns a warning saying so. Any other difference is a DeclarationConflict.
    """
    if is_broadcast_queue(queue):  # a worker's own: no dead-letter route, gone with it
        channel = connection.channel()
        try:
            _declare(channel, queue,
                     arguments={"x-expires": round(BROADCAST_EXPIRES * 1000)})
        finally:
            if channel.is_open:
                channel.close()
        return None
    arguments = work_queue_arguments(queue, max_priority)
    warning = None
    for _ in range(3):
        channel = connection.channel()
        try:
            if "x-dead-letter-routing-key" in arguments:
                # Where the route leads must exist before anything expires into it.
                _declare(channel, dead_letter_queue_name(queue))
            _declare(channel, queue, arguments=arguments)
            return warning
        except DeclarationConflict as exc:
            found = _INEQUIVALENT.search(str(exc))
            arg = found.group("arg") if found else ""
            if arg == "x-queue-type" and found and found.group("current"):
                arguments = {**arguments, "x-queue-type": found.group("current")}
            elif arg.startswith("x-dead-letter-") and "x-dead-letter-exchange" in arguments:
                arguments = {k: v for k, v in arguments.items() if not k.startswith("x-dead")}
                warning = _no_route_warning(queue)
            else:
                raise
        finally:
            if channel.is_open:
                channel.close()
    raise DeclarationConflict(f"queue {queue!r}: could not agree on its arguments with the broker")


def _no_route_warning(queue: str) -> str:
    dlq = dead_letter_queue_name(queue)
    return (
        f"queue {queue!r} was declared without a dead-letter route (by taskq 0.1, a Celery "
        f"peer or by hand): a message whose per-message expiration passes in it is dropped "
        f"by the broker, not kept in {dlq}. To keep those too: rabbitmqctl set_policy "
        f"taskq-dlq-{queue} '^{queue}$' "
        f'\'{{"dead-letter-exchange":"","dead-letter-routing-key":"{dlq}"}}\' '
        "--apply-to queues"
    )


def declare_dead_letter_queue(channel: Any, queue: str) -> str:
    name = dead_letter_queue_name(queue)
    _declare(channel, name)
    return name


def rate_queue_name(key: str, interval: float) -> str:
    """Where the starts of a rate-limited task are marked: per key and interval (a changed
    rate uses a new queue; the old one expires)."""
    name = f"taskq.rate.{key}.{max(1, round(interval * 1000))}ms"
    if len(name.encode()) > 200:  # a queue name is at most 255 bytes
        name = f"taskq.rate.{hashlib.sha256(key.encode()).hexdigest()[:32]}." \
               f"{max(1, round(interval * 1000))}ms"
    return name


def rate_queue_expires(interval: float) -> float:
    """Seconds an unused rate queue lives: long past its last mark."""
    return max(2 * interval, 300.0)


def declare_rate_queue(channel: Any, name: str, interval: float) -> None:
    """A queue that holds at most one mark and lets it expire after ``interval``: while it
    holds one, the broker refuses (nacks) the next, so one publish decides atomically, for
    every process, whether a start may happen now."""
    _declare(channel, name, arguments={
        "x-max-length": 1,
        "x-overflow": "reject-publish",
        "x-message-ttl": max(1, round(interval * 1000)),
        "x-expires": round(rate_queue_expires(interval) * 1000),
    })


def declare_reply_queue(channel: Any, name: str, expires: float) -> None:
    _declare(channel, name, arguments={"x-expires": int(expires * 1000)})
