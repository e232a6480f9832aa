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

from typing import Any

from amqp import exceptions as amqp_errors

from ...errors import DeclarationConflict


def dead_letter_queue_name(queue: str) -> str:
    return f"{queue}.dlq"


def work_queue_arguments(queue: str) -> dict[str, Any]:
    return {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dead_letter_queue_name(queue),
    }


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


def declare_work_queue(connection: Any, queue: str) -> str | None:
    """Declare ``queue`` (on a channel of its own: a refusal closes the channel it came on).

    Returns a warning if the queue exists without taskq's dead-letter arguments (it is used as
    it is); raises DeclarationConflict if it exists with other arguments that matter.
    """
    channel = connection.channel()
    try:
        try:
            _declare(channel, queue, arguments=work_queue_arguments(queue))
            return None
        except DeclarationConflict as exc:
            if "'x-dead-letter-" not in str(exc):
                raise
        # Declared without them, then: any other argument that differs still is a conflict.
        channel = connection.channel()
        _declare(channel, queue)
        return (
            f"queue {queue!r} was declared without a dead-letter route (by taskq 0.1 or a Celery "
            "peer): a message whose per-message expiration passes in it is dropped by the "
            "broker, not kept in "
            f"{dead_letter_queue_name(queue)}. To keep those too: rabbitmqctl set_policy "
            f"taskq-dlq-{queue} '^{queue}$' "
            f"'{{\"dead-letter-exchange\":\"\",\"dead-letter-routing-key\":\""
            f"{dead_letter_queue_name(queue)}\"}}' --apply-to queues"
        )
    finally:
        if channel.is_open:
            channel.close()


def declare_dead_letter_queue(channel: Any, queue: str) -> str:
    name = dead_letter_queue_name(queue)
    _declare(channel, name)
    return name


def declare_reply_queue(channel: Any, name: str, expires: float) -> None:
    _declare(channel, name, arguments={"x-expires": int(expires * 1000)})
