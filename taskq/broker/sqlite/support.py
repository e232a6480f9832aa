"""What a worker's supervisor does on the embedded broker: give back what a dead slot held,
and keep the file's write-ahead log short.

The kernel tells a dead holder from a live one (:mod:`.liveness`), so nothing waits for a
timeout: when a slot process dies, its supervisor puts the message it held back in its queue
at once (a lost run counted, unless the worker itself stopped it in a cold shutdown); a
worker that starts gives back what dead workers held.

Checkpoints: a thread of the supervisor copies the log into the file every
:data:`~.store.CHECKPOINT_EVERY` seconds, so that the commits of senders and slots (which
would otherwise do it, fsync included, every few thousand pages) stay short.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from ..base import WorkerSupport
from .store import CHECKPOINT_EVERY

if TYPE_CHECKING:
    from . import SqliteBroker

log = logging.getLogger("taskq.broker")

#: A rate key with no start for this long (seconds) is forgotten when a worker starts.
STALE_RATES = 86400.0


#: How often a running worker drops workflow state past ``workflow_expires`` (seconds).
FORGET_EVERY = 600.0


class SqliteWorkerSupport(WorkerSupport):
    def __init__(self, broker: SqliteBroker) -> None:
        super().__init__()
        self.broker = broker
        self._stop = threading.Event()
        self._checkpointer: threading.Thread | None = None

    def recover(self) -> None:
        self.broker.sweep()
        with self.broker.store.write() as conn:  # rate keys of workers long gone
            conn.execute("DELETE FROM rates WHERE last < ?", (time.time() - STALE_RATES,))
        self._forget_workflows()
        self._checkpointer = threading.Thread(
            target=self._checkpoint, name="taskq-checkpoint", daemon=True)
        self._checkpointer.start()

    def _forget_workflows(self) -> None:
        """Chords whose last part came ``workflow_expires`` ago (a header failed, or a
        header task ran again long after its chord completed), and the record of workflow
        messages sent that long ago."""
        expired = time.time() - self.broker.config.workflow_expires
        with self.broker.store.write() as conn:
            conn.execute("DELETE FROM chord_parts WHERE chord IN (SELECT chord FROM chord_parts "
                         "GROUP BY chord HAVING max(created) < ?)", (expired,))
            conn.execute("DELETE FROM sent WHERE at < ?", (expired,))

    def _checkpoint(self) -> None:
        forget_at = time.monotonic() + FORGET_EVERY
        while not self._stop.wait(CHECKPOINT_EVERY):
            try:
                self.broker.store.checkpoint()
                if time.monotonic() >= forget_at:
                    forget_at = time.monotonic() + FORGET_EVERY
                    self._forget_workflows()
            except Exception as exc:  # the commits' own checkpoints still run: say, go on
                log.debug("background checkpoint failed: %s", exc)

    def close(self) -> None:
        self._stop.set()
        if self._checkpointer is not None:
            self._checkpointer.join(timeout=5)
        super().close()

    def slot_exited(self, index: int, data: bytes, *, died: bool) -> None:
        try:
            if data:
                self.broker.sweep(only=int(data), count=died)
        except ValueError:
            pass
        finally:
            super().slot_exited(index, data, died=died)
