"""Dead letters in the embedded broker (what ``taskq dlq`` reads, replays and purges).

They are rows of their own table, read in pages (bounded memory for any number of them);
replaying one moves it back into its queue in the same transaction that deletes it, so a
replay interrupted anywhere neither loses nor duplicates a letter.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ...errors import BrokerError
from ...message import Envelope
from ..base import Admin, DeadLetter
from .client import insert_message
from .store import decode_props

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
