"""Dead letters in the embedded broker (what ``taskq dlq`` reads, replays and purges).

They are rows of their own table, read in pages (bounded memory for any number of them);
replaying one moves it back into its queue in the same transaction that deletes it, so a
replay interrupted anywhere neither loses nor duplicates a letter.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ...errors import BrokerError
from ...message import Envelope
from ..base import Admin, DeadLetter, QueueStats
from .client import insert_message
from .names import is_member
from .store import decode_props
from .wake import queue_key

if TYPE_CHECKING:
    from . import SqliteBroker

PAGE = 500


class SqliteAdmin(Admin):
    def __init__(self, broker: SqliteBroker) -> None:
        self.broker = broker
        self.store = broker.store
        self.store.connection()

    def close(self) -> None:
        pass

    def _known(self, queue: str) -> None:
        if not self.store.read("SELECT 1 FROM queues WHERE name = ?", (queue,)):
            raise BrokerError(
                f"queue {self.broker.dead_letter_name(queue)!r} does not exist in "
                f"{self.broker.path} (nothing has ever used queue {queue!r} there)"
            )

    def dead_letter_count(self, queue: str) -> int:
        self._known(queue)
        return int(self.store.read("SELECT COUNT(*) FROM dead WHERE queue = ?", (queue,))[0][0])

    def _pages(self, queue: str) -> Iterator[list[Any]]:
        last = 0
        while True:
            rows = self.store.read(
                "SELECT id, body, props, exception, reason, dead_at, worker FROM dead "
                "WHERE queue = ? AND id > ? ORDER BY id LIMIT ?", (queue, last, PAGE))
            if not rows:
                return
            last = rows[-1][0]
            yield rows

    def dead_letters(self, queue: str) -> Iterator[DeadLetter]:
        self._known(queue)
        for page in self._pages(queue):
            for row in page:
                yield _letter(queue, row)

    def replay(
        self,
        queue: str,
        wanted: Callable[[DeadLetter], bool],
        rebuild: Callable[[DeadLetter], tuple[Envelope, str]],
    ) -> Iterator[tuple[DeadLetter, str]]:
        self._known(queue)
        last_at_start = self.store.read("SELECT MAX(id) FROM dead WHERE queue = ?", (queue,))
        limit = last_at_start[0][0] or 0
        for page in self._pages(queue):
            chosen = [(row, _letter(queue, row)) for row in page if row[0] <= limit]
            chosen = [(row, letter) for row, letter in chosen if wanted(letter)]
            if not chosen:
                if page[-1][0] >= limit:
                    return
                continue
            moved = [(row, letter, *rebuild(letter)) for row, letter in chosen]
            now = time.time()
            with self.store.write() as conn:
                for row, _, envelope, _ in moved:
                    conn.execute(*insert_message(envelope, now))
                    conn.execute("DELETE FROM dead WHERE id = ?", (row[0],))
            self.broker.waker.wake({envelope.queue for _, _, envelope, _ in moved})
            for _, letter, _, note in moved:
                yield letter, note

    def purge(self, queue: str) -> int:
        self._known(queue)
        with self.store.write() as conn:
            return int(conn.execute("DELETE FROM dead WHERE queue = ?", (queue,)).rowcount)


    def known_queues(self) -> list[str]:
        return [name for (name,) in self.store.read("SELECT name FROM queues ORDER BY name")
                if not is_member(name)]

    def queue_stats(self, queues: Iterable[str]) -> list[QueueStats]:
        wanted = list(dict.fromkeys(queues))
        if not wanted:
            return []
        marks = ",".join("?" * len(wanted))
        now = time.time()
        exists = {name for (name,) in self.store.read(
            f"SELECT name FROM queues WHERE name IN ({marks})", wanted)}
        counts: dict[str, list[Any]] = {q: [0, 0, None] for q in exists}
        for queue, held, n, oldest in self.store.read(
                f"SELECT queue, holder IS NOT NULL, COUNT(*), MIN(due) FROM messages "
                f"WHERE queue IN ({marks}) AND (holder IS NOT NULL OR due <= ?) "
                f"GROUP BY queue, holder IS NOT NULL", [*wanted, now]):
            row = counts.setdefault(queue, [0, 0, None])
            if held:
                row[1] = n
            else:
                row[0], row[2] = n, oldest
        dead = dict(self.store.read(
            f"SELECT queue, COUNT(*) FROM dead WHERE queue IN ({marks}) GROUP BY queue", wanted))
        return [
            QueueStats(q, counts[q][0], counts[q][1], self._waiters(q), int(dead.get(q, 0)),
                       max(0.0, now - counts[q][2]) if counts[q][2] is not None else None)
            for q in wanted if q in counts
        ]

    def _waiters(self, queue: str) -> int:
        """The slots waiting on ``queue``: their links in its wake-up folder."""
        try:
            return len(os.listdir(self.broker.wake_dir / queue_key(queue)))
        except OSError:
            return 0


def _letter(queue: str, row: Any) -> DeadLetter:
    letter_id, body, props_text, exception, reason, dead_at, worker = row
    props = decode_props(props_text)
    headers = props.get("headers") or {}
    task_id = headers.get("id") or props.get("correlation_id")
    return DeadLetter(
        id=str(task_id or "?"),
        task=str(headers.get("task") or "?"),
        exception=exception,
        reason=reason,
        dead_at=dead_at,
        original_queue=queue,
        worker=worker,
        body=body,
        content_type=props.get("content_type"),
        headers=headers,
        reply_to=props.get("reply_to"),
        ref=letter_id,
    )
