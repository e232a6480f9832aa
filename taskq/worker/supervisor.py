"""The worker: N slots, each a process (or, with ``--pool threads``, a thread), and signals.

``taskq worker`` builds a :class:`Worker` and calls :meth:`Worker.run`.  Each slot owns one
broker connection and runs its tasks itself (see :mod:`taskq.worker.slot`), so ``-c N`` runs N
tasks at once on N cores.  The supervisor starts the slots, starts a new one when one dies
(keeping the concurrency), logs a broker outage once for all of them, and stops them:

* the first SIGTERM/SIGINT is a warm shutdown: slots stop taking messages, finish and ack what
  they run (within ``shutdown_timeout``), and the worker exits 0;
* a second signal, or the timeout passing, is a cold shutdown: slots are killed, their unacked
  messages return to the queue, and the worker exits 1.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import threading
import time
from typing import Any

from .. import __version__
from ..app import App
from ..errors import ConfigurationError, DeclarationConflict, TaskqError
from .heartbeat import Heartbeater
from .process import FATAL, FATAL_EXIT, LABEL_SIZE, LOST, RESTORED, STOP, slot_main
from .slot import Slot
from .triage import SlotOptions

log = logging.getLogger("taskq.worker")

POOLS = ("process", "threads")


class OutageLog:
    """Logs a broker outage once for the whole worker, not once per slot per retry.

    A slot busy with a task notices its connection died only when the task ends, perhaps
    after the other slots have reconnected: a connection opened before the outage already
    announced is a straggler of that outage, not a new one.
    """

    def __init__(self, display_url: str) -> None:
        self.display_url = display_url
        self._lost: set[str] = set()
        self._announced = False
        self._outage_started = float("-inf")
        self._lock = threading.Lock()
        #: What each slot runs right now ("name[id]"), for the shutdown message.
        self.busy: dict[str, str] = {}

    def connection_lost(self, slot: str, reason: str, opened_at: float | None = None) -> None:
        """``opened_at``: when the connection that failed was opened (monotonic clock)."""
        with self._lock:
            self._lost.add(slot)
            straggler = opened_at is not None and opened_at < self._outage_started
            announce = not self._announced and not straggler
            if announce:
                self._announced = True
                self._outage_started = time.monotonic()
        if announce:
            log.warning(
                "lost the connection to the broker at %s (%s); reconnecting",
                self.display_url,
                reason,
            )
        elif straggler:
            log.debug("%s also lost its connection in the last outage (%s)", slot, reason)

    def connection_restored(self, slot: str) -> None:
        with self._lock:
            if slot not in self._lost:
                return
            self._lost.discard(slot)
            done = not self._lost and self._announced
            if done:
                self._announced = False
        if done:
            log.warning("reconnected to the broker at %s", self.display_url)

    def running(self, slot: str, label: str | None) -> None:
        if label:
            self.busy[slot] = label
        else:
            self.busy.pop(slot, None)

    def holding(self, slot: str, handle: int | None) -> None:
        pass  # slots in this process: nobody outlives them to settle their deaths


class SlotProcess:
    """One slot process and the supervisor's handles on it."""

    def __init__(self, context: Any, options: SlotOptions, index: int) -> None:
        self.index = index
        self.name = f"slot-{index}"
        self.control, child_end = context.Pipe()
        self.label = context.Array("c", LABEL_SIZE, lock=False)
        self.process = context.Process(
            target=slot_main, name=self.name, args=(options, index, child_end, self.label)
        )
        self.process.start()
        child_end.close()
        self.started = time.monotonic()
        self.stopping = False

    def send(self, message: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.control.send(message)

    def describe_exit(self) -> str:
        code = self.process.exitcode
        if code is not None and code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    def running(self) -> str:
        return bytes(self.label.value).decode(errors="replace")


class Worker:
    def __init__(
        self,
        app: App,
        *,
        app_spec: str,
        queues: list[str] | None = None,
        concurrency: int | None = None,
        pool: str = "process",
        loglevel: int = logging.INFO,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        shutdown_timeout: float = 60.0,
    ) -> None:
        if pool not in POOLS:
            raise ConfigurationError(f"--pool must be one of {', '.join(POOLS)}, not {pool!r}")
        names = list(dict.fromkeys(queues or [app.config.default_queue]))
        if not all(names):
            raise ConfigurationError("queue names must not be empty (check -Q)")
        self.concurrency = concurrency or os.cpu_count() or 1
        if self.concurrency < 1:
            raise ConfigurationError("concurrency (-c) must be at least 1")
        self.app = app
        self.broker = app.broker
        self.options = SlotOptions(
            app_spec=app_spec,
            queues=tuple(names),
            pool=pool,
            loglevel=loglevel,
            time_limit=time_limit if time_limit is not None else app.config.time_limit,
            soft_time_limit=(
                soft_time_limit if soft_time_limit is not None else app.config.soft_time_limit
            ),
            hostname=f"{os.getpid()}@{socket.gethostname()}",
        )
        self.shutdown_timeout = shutdown_timeout
        self.outages = OutageLog(self.broker.display_url)
        self._signals = 0
        self._stop_deadline: float | None = None

    # -- starting -----------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until a signal stops the worker; return the process exit code."""
        self._check_broker()
        self._banner()
        if self.options.pool == "threads":
            return self._run_threads()
        return self._run_processes()

    def _check_broker(self) -> None:
        """Check the queues once up front: a conflict is an error now, not a crash loop."""
        delay = 0.5
        waited = False
        while True:
            try:
                warnings = self.broker.check_queues(
                    self.options.queues, timeout=self.app.config.connect_timeout
                )
            except DeclarationConflict:
                raise
            except Exception as exc:
                if not self.broker.is_recoverable(exc):
                    raise
                if not waited:
                    log.warning(
                        "waiting for the broker at %s (%s)",
                        self.broker.display_url,
                        self.broker.describe(exc),
                    )
                    waited = True
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            for warning in warnings:
                log.warning("%s", warning)
            return

    def _banner(self) -> None:
        queues = ", ".join(
            f"{q} (dead letters: {self.broker.dead_letter_name(q)})" for q in self.options.queues
        )
        kind = "processes" if self.options.pool == "process" else "threads"
        limits = ""
        if self.options.time_limit or self.options.soft_time_limit:
            limits = (
                f"\n  time limits: hard {self.options.time_limit}s, "
                f"soft {self.options.soft_time_limit}s"
            )
        log.info(
            "taskq worker %s (pid %d)\n  broker:      %s\n  queues:      %s\n"
            "  concurrency: %d (%s)%s\n  tasks:       %s",
            __version__,
            os.getpid(),
            self.broker.location,
            queues,
            self.concurrency,
            kind,
            limits,
            "\n               ".join(sorted(self.app.tasks)) or "(none registered)",
        )
        if self.options.pool == "threads" and self.options.soft_time_limit:
            log.warning(
                "soft time limits need the process pool (signals reach only a "
                "process's main thread): --soft-time-limit is ignored with threads"
            )

    def _install_signals(self) -> int:
        """Count SIGTERM/SIGINT; return a descriptor that becomes readable when one arrives."""
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write)

        def count(signum: int, frame: Any) -> None:
            self._signals += 1

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, count)
        return read

    def _on_signals(self, stop_all: Any, kill_all: Any, busy: Any) -> bool:
        """Act on the signals received so far; True once the worker must exit at once."""
        if self._signals >= 1 and self._stop_deadline is None:
            busy = ", ".join(sorted(busy())) or "none"
            log.warning(
                "warm shutdown: finishing running tasks (%s) for up to %gs; send the "
                "signal again to stop at once",
                busy,
                self.shutdown_timeout,
            )
            self._stop_deadline = time.monotonic() + self.shutdown_timeout
            stop_all()
        if self._signals >= 2:
            log.warning(
                "cold shutdown: running tasks are stopped and their messages return to the queue"
            )
            kill_all()
            return True
        if self._stop_deadline is not None and time.monotonic() > self._stop_deadline:
            log.error(
                "shutdown_timeout of %gs passed with tasks still running; stopping them "
                "(their messages return to the queue)",
                self.shutdown_timeout,
            )
            kill_all()
            return True
        return False

    # -- slots as processes ------------------------------------------------------------------

    def _run_processes(self) -> int:
        wakeup = self._install_signals()
        pool = SlotProcesses(self.options, self.concurrency, self.outages)
        while True:
            ready = multiprocessing.connection.wait([wakeup, *pool.waitables()], timeout=0.5)
            with contextlib.suppress(OSError):
                os.read(wakeup, 512)
            pool.handle(ready, stopping=self._stop_deadline is not None)
            if pool.fatal and self._stop_deadline is None:
                pool.stop_all()
                self._stop_deadline = time.monotonic() + 5
            if self._on_signals(pool.stop_all, pool.kill_all, pool.running):
                return 1
            if self._stop_deadline is None:
                pool.restart_due()
            elif not pool.slots:
                if pool.fatal:
                    raise TaskqError(pool.fatal)
                log.info("worker stopped")
                return 0

    # -- slots as threads ----------------------------------------------------------------------

    def _run_threads(self) -> int:
        slots = [
            Slot(self.app, self.options, i, self.outages, main_thread=False)
            for i in range(1, self.concurrency + 1)
        ]
        errors: list[BaseException] = []

        def serve(slot: Slot) -> None:
            try:
                slot.run()
            except BaseException as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=serve, args=(s,), name=s.name, daemon=True) for s in slots
        ]
        beats = Heartbeater(lambda: slots).start()
        wakeup = self._install_signals()
        for thread in threads:
            thread.start()

        def stop_all() -> None:
            for slot in slots:
                slot.stop()

        while any(thread.is_alive() for thread in threads):
            multiprocessing.connection.wait([wakeup], timeout=0.5)
            with contextlib.suppress(OSError):
                os.read(wakeup, 512)
            if errors and self._stop_deadline is None:
                stop_all()
                self._stop_deadline = time.monotonic() + 5
            # A copy: slot threads change the dict meanwhile (dict.copy() is atomic).
            if self._on_signals(stop_all, lambda: None, lambda: self.outages.busy.copy().values()):
                for slot in slots:
                    slot.kill_current()
                logging.shutdown()
                os._exit(1)  # threads can't be killed: leaving is how a cold stop ends them
        beats.stop()
        if errors:
            raise errors[0]
        log.info("worker stopped")
        return 0


class SlotProcesses:
    """The slot processes of one worker: started, watched, restarted when one dies."""

    def __init__(self, options: SlotOptions, concurrency: int, outages: OutageLog) -> None:
        self.options = options
        self.outages = outages
        self.context: Any = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload([options.app_spec.partition(":")[0]])
        self.slots = {i: SlotProcess(self.context, options, i) for i in range(1, concurrency + 1)}
        self.restart_at: dict[int, float] = {}
        self.backoff: dict[int, float] = {}
        #: The first unrecoverable error a slot reported (the worker then stops, exit 1).
        self.fatal: str | None = None

    def waitables(self) -> list[Any]:
        return [x for slot in self.slots.values() for x in (slot.process.sentinel, slot.control)]

    def running(self) -> list[str]:
        return [label for slot in self.slots.values() if (label := slot.running())]

    def stop_all(self) -> None:
        for slot in self.slots.values():
            slot.stopping = True
            slot.send(STOP)

    def kill_all(self) -> None:
        for slot in self.slots.values():
            if slot.process.is_alive():
                slot.process.kill()

    def handle(self, ready: list[Any], *, stopping: bool) -> None:
        for slot in list(self.slots.values()):
            self._read_reports(slot)
            if slot.process.sentinel in ready or not slot.process.is_alive():
                slot.process.join(1)
                if slot.process.exitcode is not None:
                    del self.slots[slot.index]
                    self._exited(slot, stopping)

    def restart_due(self) -> None:
        for index, when in list(self.restart_at.items()):
            if time.monotonic() >= when:
                del self.restart_at[index]
                self.slots[index] = SlotProcess(self.context, self.options, index)

    def _read_reports(self, slot: SlotProcess) -> None:
        with contextlib.suppress(EOFError, OSError):
            while slot.control.poll():
                kind, name, *rest = slot.control.recv()
                if kind == LOST:
                    self.outages.connection_lost(name, rest[0], rest[1])
                elif kind == RESTORED:
                    self.outages.connection_restored(name)
                elif kind == FATAL:
                    self.fatal = self.fatal or rest[0]

    def _exited(self, slot: SlotProcess, stopping: bool) -> None:
        self.outages.connection_restored(slot.name)  # a dead slot no longer waits for the broker
        if slot.process.exitcode == FATAL_EXIT:
            self.fatal = self.fatal or f"{slot.name} stopped"
            return
        if slot.stopping or stopping:
            return
        running = slot.running()
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
