"""What a worker's supervisor does on the embedded broker: give back what a dead slot held.

The kernel tells a dead holder from a live one (:mod:`.liveness`), so nothing waits for a
timeout: when a slot process dies, its supervisor puts the message it held back in its queue
at once (a lost run counted, unless the worker itself stopped it in a cold shutdown); a
worker that starts gives back what dead workers held.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..base import WorkerSupport

if TYPE_CHECKING:
    from . import SqliteBroker


class SqliteWorkerSupport(WorkerSupport):
    def __init__(self, broker: SqliteBroker) -> None:
        super().__init__()
        self.broker = broker

    def recover(self) -> None:
        self.broker.sweep()

    def slot_exited(self, index: int, data: bytes, *, died: bool) -> None:
        try:
            if data:
                self.broker.sweep(only=int(data), count=died)
        except ValueError:
            pass
        finally:
            super().slot_exited(index, data, died=died)
