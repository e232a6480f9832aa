"""A slot in a process of its own: what ``taskq worker -c N`` starts N of.

The supervisor and a slot process talk over one pipe: the supervisor sends ``"stop"`` (warm
shutdown); the slot reports its connection being lost and restored (the supervisor logs an
outage once for all slots), errors it can't recover from, and hands over a descriptor its
broker link wants held across its death (see :class:`taskq.broker.base.WorkerSupport`). The
slot's run record (a small shared file) says what it runs, so that if the process dies the
supervisor can say which task killed it and the broker can count the lost run. If the
supervisor dies, even by kill -9, the pipe closes and the slot exits with it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from multiprocessing.connection import Connection
from multiprocessing.reduction import send_handle

from ..broker.records import RunRecord
from ..errors import TaskqError
from .heartbeat import Heartbeater
from .slot import Slot
from .triage import SlotOptions

log = logging.getLogger("taskq.worker")

STOP = "stop"
LOST, RESTORED, FATAL, HOLD = "lost", "restored", "fatal", "hold"
#: Exit code of a slot process that met an error restarting it won't fix.
FATAL_EXIT = 3
#: Exit code of a slot process that retired between tasks to be replaced (recycling).
RECYCLE_EXIT = 4


class PipeReporter:
    def __init__(self, control: Connection) -> None:
        self._control = control
        self._lock = threading.Lock()

    def _send(self, message: tuple[object, ...], handle: int | None = None) -> None:
        with contextlib.suppress(OSError), self._lock:
            self._control.send(message)
            if handle is not None:
                send_handle(self._control, handle, 0)  # (the pid matters on Windows only)

    def connection_lost(self, slot: str, reason: str, opened_at: float | None = None) -> None:
        self._send((LOST, slot, reason, opened_at))

    def connection_restored(self, slot: str) -> None:
        self._send((RESTORED, slot))

    def holding(self, slot: str, handle: int | None) -> None:
        if handle is not None:
            self._send((HOLD, slot), handle)


def slot_main(
    options: SlotOptions,
    index: int,
    control: Connection,
    record_path: str,
    state: dict[str, str],
) -> None:
    """Entry point of a slot process."""
    # Shutdown is the supervisor's call: a Ctrl-C sent to the whole process group, or a
    # SIGTERM from a service manager, must not cut a running task short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from ..loading import load_app
    from ..logs import setup_logging
    from .execute import install_soft_limit_handler

    setup_logging(options.loglevel)
    app = load_app(options.app_spec)
    install_soft_limit_handler()
    app.hooks.call("on_slot_start", app.hooks.slot_start)
    slot = Slot(
        app,
        options,
        index,
        PipeReporter(control),
        record=RunRecord(record_path),
        state=state,
        main_thread=True,
    )
    threading.Thread(
        target=_listen, args=(control, slot), name="taskq-control", daemon=True
    ).start()
    beats = Heartbeater(lambda: (slot,)).start()
    try:
        slot.run()
        beats.stop()
    except TaskqError as exc:  # a queue conflict, refused credentials, unusable TLS settings
        with contextlib.suppress(OSError):
            control.send((FATAL, slot.name, str(exc)))
        os._exit(FATAL_EXIT)
    except BaseException:
        log.exception("%s stopped by an unexpected error", slot.name)
        os._exit(1)
    if slot.recycle:
        raise SystemExit(RECYCLE_EXIT)


def _listen(control: Connection, slot: Slot) -> None:
    while True:
        try:
            message = control.recv()
        except (EOFError, OSError):
            # The supervisor is gone: don't keep running a task as an orphan (its message is
            # being redelivered elsewhere).
            os._exit(70)
        if message == STOP:
            slot.stop()
        elif isinstance(message, tuple):
            slot.watch.apply(message)  # from the worker's monitor (see .reports)
