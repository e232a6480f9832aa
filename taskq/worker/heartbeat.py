"""Heartbeats for a connection whose thread is busy running a task.

A slot runs each task in the thread that owns its broker connection (no hand-off: that is
what keeps a round trip close to the bare AMQP floor).  While a task runs, nobody reads or
writes that connection, and RabbitMQ would drop it after two missed heartbeats (kombu#806 is
that trap in Celery's solo pool).  This thread sends the heartbeats meanwhile; frames are
written under a lock shared with the slot (see ``SlotConnection``), so a heartbeat never
interleaves with a result being published.

A task that holds the GIL for longer than two heartbeat intervals (a long C call that does not
release it) starves this thread too; the connection then drops, the message is redelivered and
the task runs again: at-least-once, as after any connection loss.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import Protocol


class Beating(Protocol):
    @property
    def keepalive_interval(self) -> float: ...

    def keepalive_if_busy(self, quiet_for: float) -> None: ...


class Heartbeater:
    def __init__(self, slots: Callable[[], Sequence[Beating]]) -> None:
        self._slots = slots
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="taskq-heartbeat", daemon=True)

    def start(self) -> Heartbeater:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        tick = 1.0
        while not self._stop.wait(tick):
            slots = self._slots()
            intervals = [s.keepalive_interval for s in slots if s.keepalive_interval]
            # The links' own tick (a quarter of a negotiated heartbeat interval: two missed
            # beats close a connection).
            tick = max(0.05, min(intervals)) if intervals else 1.0
            for slot in slots:
                with contextlib.suppress(Exception):  # a dead connection is the slot's business
                    slot.keepalive_if_busy(tick)
