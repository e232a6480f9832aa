"""Dead letters: reading, replaying and purging ``<queue>.dlq`` (what ``taskq dlq`` runs).

A dead letter is the original message plus why it could not be processed (see
:mod:`taskq.worker.letters`).  Replaying publishes it back to the queue it came from, as it was
first sent, and removes it from the dead-letter queue only once the broker confirmed the copy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .app import App
from .broker.amqp.admin import QueueAdmin
from .broker.amqp.topology import dead_letter_queue_name
from .message import Delivery, bounded_repr, parse_body
from .worker import letters


def work_queue_name(queue: str) -> str:
    """Accept either the work queue's name or its dead-letter queue's."""
    return queue[: -len(".dlq")] if queue.endswith(".dlq") else queue


@dataclass(frozen=True)
class DeadLetter:
    id: str
    task: str
    exception: str
    reason: str
    dead_at: str
    original_queue: str
    worker: str
    delivery: Delivery

    @classmethod
    def from_delivery(cls, delivery: Delivery, queue: str) -> DeadLetter:
        h = delivery.headers
        return cls(
            id=delivery.task_id or "?",
            task=delivery.task_name or "?",
            exception=str(h.get(letters.DEAD_EXCEPTION, "?")),
            reason=str(h.get(letters.DEAD_REASON, "(no reason recorded)")),
            dead_at=str(h.get(letters.DEAD_AT, "?")),
            original_queue=str(h.get(letters.DEAD_QUEUE) or queue),
            worker=str(h.get(letters.DEAD_WORKER, "?")),
            delivery=delivery,
        )

    def details(self) -> dict[str, Any]:
        """Everything worth showing about it, in reading order."""
        h = self.delivery.headers
        return {
            "id": self.id,
            "task": self.task,
            "queue": self.original_queue,
            "exception": self.exception,
            "reason": self.reason,
            "dead at": self.dead_at,
            "worker": self.worker,
            **self._arguments(),
            "retries": h.get("retries", 0),
            "eta": h.get("eta"),
            "expires": h.get("expires"),
            "reply to": self.delivery.reply_to,
            "content type": self.delivery.content_type,
            "body": f"{len(self.delivery.body)} bytes",
        }

    def _arguments(self) -> dict[str, str]:
        """The arguments, decoded from the body if it is JSON (never unpickled here)."""
        try:
            args, kwargs = parse_body(self.delivery, ("json",))
        except Exception as exc:  # an undecodable body is often why it is here
            h = self.delivery.headers
            if "argsrepr" in h:  # a Celery client sends reprs of its own
                return {"args": str(h["argsrepr"]), "kwargs": str(h.get("kwargsrepr", ""))}
            return {"args": f"(body not readable as JSON: {exc})", "kwargs": ""}
        return {"args": bounded_repr(tuple(args)), "kwargs": bounded_repr(kwargs)}


class DeadLetters:
    def __init__(self, app: App) -> None:
        self.app = app

    def _admin(self) -> QueueAdmin:
        broker = self.app.broker
        return QueueAdmin(
            broker.connector, broker.declared, timeout=self.app.config.publish_timeout
        )

    def browse(self, queue: str, limit: int = 50) -> tuple[int, list[DeadLetter]]:
        """(how many there are, the first ``limit`` of them); nothing is removed."""
        dlq = dead_letter_queue_name(work_queue_name(queue))
        with self._admin() as admin:
            total = admin.size(dlq)
            found = [
                DeadLetter.from_delivery(d, work_queue_name(queue))
                for d in admin.read(dlq, min(limit, total))
            ]
        return total, found

    def find(self, task_id: str, queues: Iterable[str]) -> DeadLetter | None:
        for queue in queues:
            dlq = dead_letter_queue_name(work_queue_name(queue))
            with self._admin() as admin:
                for delivery in admin.read(dlq, admin.size(dlq)):
                    if delivery.task_id == task_id:
                        return DeadLetter.from_delivery(delivery, work_queue_name(queue))
        return None

    def replay(self, queue: str, ids: Iterable[str] | None = None) -> list[DeadLetter]:
        """Send dead letters (those with ``ids``, or all) back to their queue to run again."""
        wanted = set(ids) if ids is not None else None
        dlq = dead_letter_queue_name(work_queue_name(queue))
        replayed: list[DeadLetter] = []
        with self._admin() as admin:
            # Only what is there now: a replayed message that fails again comes back behind.
            for delivery in admin.read(dlq, admin.size(dlq)):
                if wanted is not None and delivery.task_id not in wanted:
                    continue
                letter = DeadLetter.from_delivery(delivery, work_queue_name(queue))
                admin.publish(letters.replay(delivery, letter.original_queue))
                admin.ack(delivery)
                replayed.append(letter)
            admin.release()
        return replayed

    def purge(self, queue: str) -> int:
        with self._admin() as admin:
            return admin.purge(dead_letter_queue_name(work_queue_name(queue)))
