"""A slot in a process of its own: what ``taskq worker -c N`` starts N of.

The supervisor and a slot process talk over one pipe: the supervisor sends ``"stop"`` (warm
shutdown); the slot reports its connection being lost and restored (the supervisor logs an
outage once for all slots) and errors it can't recover from. A small shared buffer holds the
task the slot is running, so that if the process dies the supervisor can say which task killed
it. If the supervisor dies, even by kill -9, the pipe closes and the slot exits with it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from multiprocessing.connection import Connection
from typing import Any

from ..errors import TaskqError
from .heartbeat import Heartbeater
from .slot import Slot
from .triage import SlotOptions

log = logging.getLogger("taskq.worker")

STOP = "stop"
LOST, RESTORED, FATAL = "lost", "restored", "fatal"
#: Exit code of a slot process that met an error restarting it won't fix.
FATAL_EXIT = 3
#: Bytes kept of the running task's "name[id]" in the shared buffer.
LABEL_SIZE = 200


class PipeReporter:
    def __init__(self, control: Connection, label: Any) -> None:
        self._control = control
        self._label = label

    def _send(self, message: tuple[object, ...]) -> None:
        with contextlib.suppress(OSError):
            self._control.send(message)

    def connection_lost(self, slot: str, reason: str, opened_at: float | None = None) -> None:
        self._send((LOST, slot, reason, opened_at))

    def connection_restored(self, slot: str) -> None:
        self._send((RESTORED, slot))

    def running(self, slot: str, label: str | None) -> None:
        self._label.value = (label or "").encode()[: LABEL_SIZE - 1]

    def holding(self, slot: str, handle: int | None) -> None:
        pass


def slot_main(options: SlotOptions, index: int, control: Connection, label: Any) -> None:
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
    slot = Slot(app, options, index, PipeReporter(control, label), main_thread=True)
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
