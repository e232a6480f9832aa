"""Dead letters: reading, replaying and purging them (what ``taskq dlq`` runs), on any broker.

A dead letter is the original message plus why it could not be processed. Replaying sends it
back to the queue it came from, as it was first sent (an expired one with its expiry cleared),
and removes the letter only once the broker has stored the copy. Letters are read one at a
time, so any number of them costs bounded memory.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

from .app import App
from .broker.base import Admin, DeadLetter
from .copies import replayed
from .message import Delivery, bounded_repr, parse_body


def details(letter: DeadLetter) -> dict[str, Any]:
    """Everything worth showing about a dead letter, in reading order."""
    h = letter.headers
    return {
        "id": letter.id,
        "task": letter.task,
        "queue": letter.original_queue,
        "exception": letter.exception,
        "reason": letter.reason,
        "dead at": letter.dead_at,
        "worker": letter.worker,
        **_arguments(letter),
        "retries": h.get("retries", 0),
        "eta": h.get("eta"),
        "expires": h.get("expires"),
        "reply to": letter.reply_to,
        "content type": letter.content_type,
        "body": f"{len(letter.body)} bytes",
    }


def _arguments(letter: DeadLetter) -> dict[str, str]:
    """The arguments, decoded from the body if it is JSON (never unpickled here)."""
    delivery = Delivery(letter.body, letter.content_type, letter.headers, None, None, False, "")
    try:
        args, kwargs = parse_body(delivery, ("json",))
    except Exception as exc:  # an undecodable body is often why it is here
        h = letter.headers
        if "argsrepr" in h:  # a Celery client sends reprs of its own
            return {"args": str(h["argsrepr"]), "kwargs": str(h.get("kwargsrepr", ""))}
        return {"args": f"(body not readable as JSON: {exc})", "kwargs": ""}
    return {"args": bounded_repr(tuple(args)), "kwargs": bounded_repr(kwargs)}


def _rebuild(letter: DeadLetter) -> tuple[Any, str]:
    return replayed(
        letter.body,
        letter.content_type,
        letter.headers,
        letter.id if letter.id != "?" else None,
        letter.reply_to,
        letter.original_queue,
    )


class DeadLetters:
    def __init__(self, app: App) -> None:
        self.app = app

    def _admin(self) -> Admin:
        broker = self.app.broker
        return broker.reach(lambda: broker.admin(timeout=self.app.config.publish_timeout))

    def name(self, queue: str) -> str:
        return self.app.broker.dead_letter_name(work_queue_name(queue))

    def browse(self, queue: str, limit: int = 50) -> tuple[int, list[DeadLetter]]:
        """(how many there are, the first ``limit`` of them); nothing is removed."""
        with self._admin() as admin:
            queue = work_queue_name(queue)
            total = admin.dead_letter_count(queue)
            first = list(itertools.islice(admin.dead_letters(queue), min(limit, total)))
        return total, first

    def find(self, task_id: str, queues: Iterable[str]) -> DeadLetter | None:
        with self._admin() as admin:
            for queue in queues:
                for letter in admin.dead_letters(work_queue_name(queue)):
                    if letter.id == task_id:
                        return letter
        return None

    def replay(
        self, queue: str, ids: Iterable[str] | None = None
    ) -> Iterator[tuple[DeadLetter, str]]:
        """Send dead letters (those with ``ids``, or all) back to their queue to run again;
        yields each replayed with a note ("" or what was changed so that it runs)."""
        wanted = set(ids) if ids is not None else None
        with self._admin() as admin:
            yield from admin.replay(
                work_queue_name(queue),
                lambda letter: wanted is None or letter.id in wanted,
                _rebuild,
            )

    def purge(self, queue: str) -> int:
        with self._admin() as admin:
            return int(admin.purge(work_queue_name(queue)))


def work_queue_name(queue: str) -> str:
    """Accept either the work queue's name or its dead letters' (``QUEUE.dlq``)."""
    return queue[: -len(".dlq")] if queue.endswith(".dlq") else queue
