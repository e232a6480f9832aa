"""The slot processes of one worker: started, watched, restarted when one dies.

A slot that dies is replaced at once (with a backoff if it keeps dying as soon as it starts),
after the broker has settled its death: the descriptor the slot handed over is held until
then (see :class:`taskq.broker.base.WorkerSupport`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.reduction import recv_handle
from typing import Any

from ..broker.base import WorkerSupport
from ..broker.records import RunRecord
from .executor import forkserver_context
from .outages import OutageLog
from .process import FATAL, FATAL_EXIT, HOLD, LOST, RECYCLE_EXIT, RESTORED, STOP, slot_main
from .triage import SlotOptions

log = logging.getLogger("taskq.worker")


class SlotProcess:
    """One slot process and the supervisor's handles on it."""

    def __init__(
        self, context: Any, options: SlotOptions, index: int, support: WorkerSupport,
        greeting: list[Any] | None = None,
    ) -> None:
        self.index = index
        self.name = f"slot-{index}"
        self.control, child_end = context.Pipe()
        path = support.run_record_path(index)
        self.record = RunRecord(path)
        self.record.clear()  # a predecessor's record was settled when it died
        self.process = context.Process(
            target=slot_main,
            name=self.name,
            args=(options, index, child_end, path, support.slot_state(index)),
        )
        self.process.start()
        child_end.close()
        self.started = time.monotonic()
        self.stopping = False
        #: Stopping to be replaced at once (its queues changed).
        self.replacing = False
        #: Killed to stop a revoked task (``revoke(terminate=True)``).
        self.terminated = False
        #: The supervisor's thread and the monitor's both send.
        self._sending = threading.Lock()
        for message in greeting or ():
            self.send(message)

    def send(self, message: Any) -> None:
        with contextlib.suppress(OSError, ValueError), self._sending:
            self.control.send(message)

    @property
    def label(self) -> str:
        return self.record.read()[0]

    @property
    def pid(self) -> int | None:
        pid: int | None = self.process.pid
        return pid

    @property
    def started_at(self) -> float | None:
        return self.record.started()

    def details(self) -> tuple[str, float | None, str]:
        return self.record.details()

    def describe_exit(self) -> str:
        code = self.process.exitcode
        if code is not None and code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    def running(self) -> str:
        return self.record.read()[0]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _stop_if_orphaned(slot: SlotProcess) -> None:
    """A slot "exits" with 255 when the fork server that reports its exit died (kill -9,
    the OOM killer): the slot may well live on, mid-task. Kill it before its messages go
    back to their queues, or a second slot would run them while it still does."""
    pid = slot.process.pid
    if slot.process.exitcode != 255 or pid is None or not _alive(pid):
        return
    log.error("%s: the fork server died; stopping the slot (pid %d) before its messages go "
              "back to their queues", slot.name, pid)
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)


class SlotProcesses:
    def __init__(
        self,
        options: SlotOptions,
        concurrency: int,
        outages: OutageLog,
        support: WorkerSupport,
        greeting: Callable[[], list[Any]] | None = None,
    ) -> None:
        self.options = options
        self.outages = outages
        self.support = support
        self.greeting = greeting or (lambda: [])
        #: Held while a slot is greeted and listed, and while every listed slot is told: a
        #: slot starting meanwhile is told what it was not greeted with.
        self._telling = threading.Lock()
        self.context: Any = forkserver_context(options.app_spec)
        self.slots: dict[int, SlotProcess] = {}
        for i in range(1, concurrency + 1):
            self._start(i)
        self.restart_at: dict[int, float] = {}
        self.backoff: dict[int, float] = {}
        #: The first unrecoverable error a slot reported (the worker then stops, exit 1).
        self.fatal: str | None = None

    def waitables(self) -> list[Any]:
        return [x for slot in self.slots.values() for x in (slot.process.sentinel, slot.control)]

    def running(self) -> list[str]:
        return [label for slot in self.slots.values() if (label := slot.running())]

    def _start(self, index: int) -> None:
        with self._telling:
            self.slots[index] = SlotProcess(self.context, self.options, index, self.support,
                                            self.greeting())

    def tell(self, message: Any) -> None:
        """Send every slot a message from the monitor (see :mod:`.reports`)."""
        with self._telling:
            for slot in list(self.slots.values()):
                slot.send(message)

    def kill_running(self, task_id: str) -> bool:
        """Kill the slot process running ``task_id`` (revoke with terminate): the slot is
        replaced, and the message, back in its queue, is refused as revoked."""
        for slot in list(self.slots.values()):
            if slot.label.endswith(f"[{task_id}]") and slot.process.is_alive():
                log.warning("%s: terminating task %s (revoked): killing the slot process",
                            slot.name, slot.label)
                slot.terminated = True
                slot.process.kill()
                return True
        return False

    def reconsume(self, options: SlotOptions) -> None:
        """Replace each slot, once it finished its task, by one that consumes ``options``'
        queues."""
        self.options = options
        for slot in self.slots.values():
            slot.replacing = True
            slot.send(STOP)

    def stop_all(self) -> None:
        for slot in self.slots.values():
            slot.stopping = True
            slot.send(STOP)

    def kill_all(self) -> None:
        """Cold shutdown: stop every slot now; what they held goes back to its queues, and
        the interrupted runs are not the tasks' fault (not counted as lost runs)."""
        for slot in self.slots.values():
            slot.stopping = True
            if slot.process.is_alive():
                slot.process.kill()
        for slot in list(self.slots.values()):
            slot.process.join(5)
            self._read_reports(slot)
            del self.slots[slot.index]
            self.support.slot_exited(slot.index, slot.record.read()[1], died=False)

    def handle(self, ready: list[Any], *, stopping: bool) -> None:
        for slot in list(self.slots.values()):
            self._read_reports(slot)
            if slot.process.sentinel in ready or not slot.process.is_alive():
                slot.process.join(1)
                if slot.process.exitcode is not None:
                    _stop_if_orphaned(slot)
                    self._read_reports(slot)  # what it said just before it went
                    del self.slots[slot.index]
                    self._exited(slot, stopping)

    def restart_due(self) -> None:
        for index, when in list(self.restart_at.items()):
            if time.monotonic() >= when:
                del self.restart_at[index]
                self._start(index)

    def _read_reports(self, slot: SlotProcess) -> None:
        with contextlib.suppress(EOFError, OSError):
            while slot.control.poll():
                kind, name, *rest = slot.control.recv()
                if kind == LOST:
                    self.outages.connection_lost(name, rest[0], rest[1])
                elif kind == RESTORED:
                    self.outages.connection_restored(name)
                elif kind == HOLD:
                    self.support.hold(slot.index, recv_handle(slot.control))
                elif kind == FATAL:
                    self.fatal = self.fatal or rest[0]

    def _exited(self, slot: SlotProcess, stopping: bool) -> None:
        self.outages.connection_restored(slot.name)  # a dead slot no longer waits for the broker
        running, data = slot.record.read()
        code = slot.process.exitcode
        died = code not in (0, RECYCLE_EXIT) and not (slot.stopping or stopping)
        self.support.slot_exited(slot.index, data, died=died)
        slot.record.clear()
        slot.control.close()
        if slot.process.exitcode == FATAL_EXIT:
            self.fatal = self.fatal or f"{slot.name} stopped"
            return
        if slot.replacing and not (slot.stopping or stopping):
            self.restart_at[slot.index] = time.monotonic()
            return
        if slot.stopping or stopping:
            return
        if slot.terminated:
            log.info("%s: replaced after terminating a revoked task", slot.name)
            self.restart_at[slot.index] = time.monotonic()
            return
        if code == RECYCLE_EXIT:  # it said why in its log; a new one starts now
            self.restart_at[slot.index] = time.monotonic()
            return
        if code == 0 and self.options.burst:
            return  # its queues had nothing ready: it is not replaced
        log.error(
            "%s process %s%s; starting a new one",
            slot.name,
            slot.describe_exit(),
            f" while running task {running}" if running else "",
        )
        # A slot that dies as soon as it starts would be restarted in a tight loop: back off.
        lived = time.monotonic() - slot.started
        delay = 0.0 if lived > 5 else min(30.0, max(0.5, self.backoff.get(slot.index, 0.25) * 2))
        self.backoff[slot.index] = delay
        self.restart_at[slot.index] = time.monotonic() + delay
