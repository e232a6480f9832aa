"""What a worker's supervisor does on RabbitMQ for its slots: count the runs their deaths cut
short, before the broker can hand the message to anyone else.

When a slot process dies, the kernel closes its sockets and RabbitMQ would at once give its
unacked message to another consumer, which would look for a lost-run count that nobody has
recorded yet. So each slot hands the supervisor a duplicate of its consuming socket
(:meth:`SlotConnection.hold_handle`): the connection stays open while the supervisor records
the lost run (read from the slot's run record), then the supervisor closes it and the broker
redelivers, count in place. A clean exit, or a slot that was idle, just closes it.

The run records and the spools live in this worker's journal (:mod:`.journal`), so that the
next worker on this machine settles them if the whole worker dies.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ...broker.records import RunRecord
from ..base import WorkerSupport
from . import lost
from .channel import ConfirmChannel
from .connection import bound, close_quietly
from .journal import Spool, WorkerJournal, broker_key, state_dir
from .publisher import publish_owed

if TYPE_CHECKING:
    import amqp

    from . import AmqpBroker

log = logging.getLogger("taskq.worker")


class AmqpWorkerSupport(WorkerSupport):
    def __init__(self, broker: AmqpBroker, name: str) -> None:
        super().__init__()
        self.broker = broker
        root = state_dir() / broker_key(broker.connector.urls)
        try:
            self.journal = WorkerJournal(root)
        except OSError as exc:
            fallback = Path(tempfile.mkdtemp(prefix="taskq-state-"))
            log.warning(
                "cannot keep this worker's journal in %s (%s): using %s, which a worker "
                "started after a crash will not find. Set $TASKQ_STATE_DIR to a writable "
                "directory.",
                root,
                exc,
                fallback,
            )
            self.journal = WorkerJournal(fallback)
        self._conn: amqp.Connection | None = None
        self._confirms: ConfirmChannel | None = None

    @property
    def location(self) -> str:
        return str(self.journal.path)

    def run_record_path(self, index: int) -> str:
        return self.journal.run_record_path(index)

    def slot_state(self, index: int) -> dict[str, str]:
        return {"spool": self.journal.spool_path(index), "lock": self.journal.lock_path()}

    # -- a slot died ---------------------------------------------------------------------------

    def slot_exited(self, index: int, data: bytes, *, died: bool) -> None:
        try:
            if died and data:
                self._record_lost(data.decode("utf-8", "surrogatepass"))
        finally:
            self.release(index)  # now the broker may redeliver what the slot held

    def _record_lost(self, name: str) -> None:
        if not name.startswith(lost.PREFIX):
            return
        try:
            confirms = self._channel()
            deadline = time.monotonic() + self.broker.config.publish_timeout
            with bound(confirms.connection).until(deadline):
                lost.record(confirms, name, deadline)
        except Exception as exc:
            self._drop()
            log.warning("could not count the lost run of %s (%s)", name, exc)

    def _channel(self) -> ConfirmChannel:
        if self._confirms is None:
            conn = self.broker.connector.connect_once(
                timeout=self.broker.config.connect_timeout, name="taskq worker supervisor"
            )
            with bound(conn).until(time.monotonic() + self.broker.config.connect_timeout):
                self._confirms = ConfirmChannel(conn)
            bound(conn).relax()
            self._conn = conn
        return self._confirms

    def _drop(self) -> None:
        close_quietly(self._conn, timeout=0.5)
        self._conn = self._confirms = None

    # -- a whole worker died -------------------------------------------------------------------

    def recover(self) -> None:
        """Settle what dead workers for this broker left on this machine, before our slots run."""
        for path in self.journal.dead_siblings():
            try:
                self._recover(path)
            except Exception as exc:
                self._drop()
                log.warning("could not settle what a dead worker left in %s (%s); will try at "
                            "the next start", path, exc)
                continue
            shutil.rmtree(path, ignore_errors=True)

    def _recover(self, path: Path) -> None:
        counted = 0
        for run in sorted(path.glob("slot-*.run")):
            record = RunRecord(str(run))
            label, data = record.read()
            record.close()
            if data:
                self._record_lost(data.decode("utf-8", "surrogatepass"))
                counted += 1
                log.warning("a worker that died here was running %s: counted as a lost run",
                            label)
        owed = 0
        for spool_path in sorted(path.glob("slot-*.spool")):
            spool = Spool(str(spool_path))
            owed += self._publish_spool(spool)
        if counted or owed:
            log.warning("settled what a dead worker left in %s: %d lost run(s), %d message(s) "
                        "it owed the broker", path, counted, owed)

    def _publish_spool(self, spool: Spool) -> int:
        items = list(spool)
        if items:
            confirms = self._channel()
            deadline = time.monotonic() + self.broker.config.publish_timeout
            with bound(confirms.connection).until(deadline):
                publish_owed(confirms, items, self.broker.declared, deadline, self.broker.config)
            spool.clear()
        return len(items)

    def close(self) -> None:
        super().close()
        owes = any(len(Spool(str(p))) for p in self.journal.path.glob("slot-*.spool"))
        self._drop()
        self.journal.close(keep=owes)
