"""What taskq declares on the broker, and how a conflicting declaration is reported.

* a work queue per task queue name: durable, **no arguments**, so Celery peers declaring the
  same queue agree with it;
* a dead-letter queue beside each (``<queue>.dlq``), durable: taskq moves messages there
  itself, with the reason in headers, instead of relying on the broker's ``rejected`` reason;
* one reply queue per client process: durable so that results survive a broker restart, with
  ``x-expires`` so that the broker deletes it once its client is gone.
"""

from __future__ import annotations

from typing import Any

from amqp import exceptions as amqp_errors

from ...errors import DeclarationConflict


def dead_letter_queue_name(queue: str) -> str:
    return f"{queue}.dlq"


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


def declare_work_queue(channel: Any, queue: str) -> None:
    _declare(channel, queue)


def declare_dead_letter_queue(channel: Any, queue: str) -> str:
    name = dead_letter_queue_name(queue)
    _declare(channel, name)
    return name


def declare_reply_queue(channel: Any, name: str, expires: float) -> None:
    _declare(channel, name, arguments={"x-expires": int(expires * 1000)})
