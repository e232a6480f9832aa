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
import dataclasses
import logging
import multiprocessing.connection
import os
import signal
import socket
import threading
import time
from typing import Any

from .. import __version__
from ..app import App
from ..beat import BeatThread
from ..broker.base import WorkerSupport
from ..broker.records import RunRecord
from ..errors import ConfigurationError, DeclarationConflict, TaskqError
from ..routing import check_binding
from .heartbeat import Heartbeater
from .monitor import Monitor, default_nodename
from .outages import OutageLog
from .pool import SlotProcesses
from .slot import Slot
from .triage import SlotOptions

log = logging.getLogger("taskq.worker")

POOLS = ("process", "threads")


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
        binds: list[str] | None = None,
        burst: bool = False,
        max_tasks_per_child: int | None = None,
        max_memory_per_child: float | None = None,
        beat: bool = False,
        events: bool = False,
        nodename: str | None = None,
        metrics_port: int | None = None,
    ) -> None:
        if pool not in POOLS:
            raise ConfigurationError(f"--pool must be one of {', '.join(POOLS)}, not {pool!r}")
        if pool == "threads" and (max_tasks_per_child or max_memory_per_child):
            raise ConfigurationError(
                "--max-tasks-per-child and --max-memory-per-child replace slot processes: "
                "use them with --pool process"
            )
        for name, value in (("max_tasks_per_child", max_tasks_per_child),
                            ("max_memory_per_child", max_memory_per_child)):
            if value is not None and value <= 0:
                raise ConfigurationError(f"{name} must be a positive number")
        names = list(dict.fromkeys(queues or [app.config.default_queue]))
        if not all(names):
            raise ConfigurationError("queue names must not be empty (check -Q)")
        hostname = f"{os.getpid()}@{socket.gethostname()}"
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
            hostname=hostname,
            broadcast_queue=app.broker.broadcast_queue(hostname),
            burst=burst,
            max_tasks_per_child=max_tasks_per_child,
            max_memory_per_child=max_memory_per_child,
        )
        self.shutdown_timeout = shutdown_timeout
        #: Topic patterns the queues are bound to at start (``--bind``).
        self.binds = [check_binding(pattern) for pattern in binds or ()]
        self.outages = OutageLog(self.broker.display_url)
        self._signals = 0
        self._stop_deadline: float | None = None
        #: ``--beat``: the app's schedule, fired from a thread of this process.
        self.beat = BeatThread(app) if beat else None
        self.events = events
        self.nodename = expand_nodename(nodename) if nodename else default_nodename()
        self.metrics_port = metrics_port
        self.monitor: Monitor | None = None
        self._pool: SlotProcesses | None = None
        self._thread_slots: list[Slot] = []
        self._wakeup_w = -1
        self._new_options: SlotOptions | None = None

    # -- starting -----------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until a signal stops the worker; return the process exit code."""
        self._check_broker()
        timeout = self.app.config.connect_timeout
        if self.binds:
            self.broker.bind(self.options.queues, self.binds, timeout)
        self.broker.join_broadcasts(self.options.hostname, self.options.queues, timeout)
        self.support = self.broker.worker_support(self.options.hostname, self.concurrency)
        metrics = None
        if self.metrics_port is not None:
            from .metrics import Metrics

            metrics = Metrics(self.app, self.metrics_port)
        self.monitor = Monitor(self.app, self.options, self, nodename=self.nodename,
                               concurrency=self.concurrency, events=self.events,
                               metrics=metrics)
        self.options = dataclasses.replace(self.options,
                                           monitor_socket=self.monitor.socket_path)
        try:
            self.support.recover()
            self.monitor.start()
            if metrics is not None:
                metrics.start(self.monitor)
            self._banner()
            self.app.hooks.call("on_worker_start", self.app.hooks.worker_start)
            if self.beat is not None:
                self.beat.start()
            if self.options.pool == "threads":
                return self._run_threads()
            return self._run_processes()
        finally:
            if self.beat is not None:
                self.beat.stop()
            self.monitor.stop()
            if metrics is not None:
                metrics.stop()
            self.support.close()
            self._leave_broadcasts()

    def _leave_broadcasts(self) -> None:
        try:
            self.broker.leave_broadcasts(self.options.hostname, self.app.config.connect_timeout)
        except Exception as exc:  # it expires (RabbitMQ) or is swept (embedded) anyway
            log.debug("could not remove this worker's broadcast queue: %s", exc)

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
        if self.binds:
            log.info("bound to routing keys matching %s", ", ".join(self.binds))
        log.info("node name %s (remote control%s)%s", self.nodename,
                 ", events on" if self.events else "",
                 f"; metrics on :{self.metrics_port}/metrics" if self.metrics_port else "")
        if self.options.burst:
            log.info("--burst: the worker exits once its queues have no message ready")
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
        self._wakeup_w = write

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
            if self.beat is not None:
                self.beat.stop(timeout=0)  # fires nothing more; a standby takes over
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
        assert self.monitor is not None
        pool = SlotProcesses(self.options, self.concurrency, self.outages, self.support,
                             self.monitor.slot_greeting)
        self._pool = pool
        while True:
            ready = multiprocessing.connection.wait([wakeup, *pool.waitables()], timeout=0.5)
            with contextlib.suppress(OSError):
                os.read(wakeup, 512)
            if self._new_options is not None and self._stop_deadline is None:
                options, self._new_options = self._new_options, None
                pool.reconsume(options)
            pool.handle(ready, stopping=self._stop_deadline is not None)
            if pool.fatal and self._stop_deadline is None:
                pool.stop_all()
                self._stop_deadline = time.monotonic() + 5
            if self._on_signals(pool.stop_all, pool.kill_all, pool.running):
                return 1
            if self._stop_deadline is None:
                pool.restart_due()
                if self.options.burst and not pool.slots and not pool.restart_at:
                    log.info("worker stopped: no message ready in its queues (--burst)")
                    return 0
            elif not pool.slots:
                if pool.fatal:
                    raise TaskqError(pool.fatal)
                log.info("worker stopped")
                return 0

    # -- slots as threads ----------------------------------------------------------------------

    def _run_threads(self) -> int:
        support: WorkerSupport = self.support
        slots = [
            Slot(
                self.app,
                self.options,
                i,
                self.outages,
                record=RunRecord(support.run_record_path(i)),
                state=support.slot_state(i),
                main_thread=False,
            )
            for i in range(1, self.concurrency + 1)
        ]
        errors: list[BaseException] = []

        def serve(slot: Slot) -> None:
            try:
                self.app.hooks.call("on_slot_start", self.app.hooks.slot_start)
                slot.run()
            except BaseException as exc:
                errors.append(exc)

        self._greet(slots)
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
            if self._on_signals(stop_all, lambda: None, lambda: _running(slots)):
                for slot in slots:
                    slot.kill_current()
                    # Give back what it held (the broker may not notice our exit by itself).
                    with contextlib.suppress(Exception):
                        support.slot_exited(slot.index, slot.record.read()[1], died=False)
                logging.shutdown()
                os._exit(1)  # threads can't be killed: leaving is how a cold stop ends them
        beats.stop()
        if errors:
            raise errors[0]
        log.info("worker stopped")
        return 0


    def _greet(self, slots: list[Slot]) -> None:
        """Tell thread slots what the monitor wants (process slots hear it on their pipe)."""
        assert self.monitor is not None
        for slot in slots:
            for message in self.monitor.slot_greeting():
                slot.watch.apply(message)
        self._thread_slots = slots

    # -- what the monitor asks (from its thread) -----------------------------------------

    def slot_views(self) -> list[SlotView]:
        pool = self._pool
        if pool is not None:
            return [SlotView(p.index, p.pid, *p.details()) for p in list(pool.slots.values())]
        return [SlotView(s.index, os.getpid(), *s.record.details()) for s in self._thread_slots]

    def tell_slots(self, message: tuple[Any, ...]) -> None:
        if self._pool is not None:
            self._pool.tell(message)
        for slot in self._thread_slots:
            slot.watch.apply(message)

    def terminate(self, task_id: str) -> bool:
        if self._pool is None:
            log.warning("revoke with terminate: tasks in --pool threads can't be stopped; "
                        "task %s runs to its end (its later messages are refused)", task_id)
            return False
        return self._pool.kill_running(task_id)

    def shutdown(self) -> None:
        log.warning("shutdown requested by remote control")
        self._signals = max(self._signals, 1)
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wakeup_w, b"\0")

    def consume(self, queue: str, *, add: bool) -> dict[str, str]:
        if self._pool is None:
            return {"error": "add_consumer/cancel_consumer need --pool process"}
        queues = list(self.options.queues)
        if add == (queue in queues):
            return {"ok": f"already consuming from {queue!r}" if add
                    else f"not consuming from {queue!r}"}
        if add:
            timeout = self.app.config.connect_timeout
            self.broker.check_queues([queue], timeout=timeout)
            self.broker.join_broadcasts(self.options.hostname, [queue], timeout)
            queues.append(queue)
        else:
            if len(queues) == 1:
                return {"error": f"{queue!r} is the worker's only queue"}
            queues.remove(queue)
        self.options = dataclasses.replace(self.options, queues=tuple(queues))
        if self.monitor is not None:
            self.monitor.queues = queues
        self._new_options = self.options
        self._wake()
        log.info("%s queue %s (remote control): slots are replaced as they finish",
                 "consuming" if add else "no longer consuming", queue)
        return {"ok": f"add consumer {queue}" if add else f"no longer consuming from {queue}"}


@dataclasses.dataclass(frozen=True)
class SlotView:
    index: int
    pid: int | None
    label: str
    started: float | None
    #: The start of the running task's arguments as JSON (``[args, kwargs, ...]``), or "".
    arguments: str = ""


def expand_nodename(name: str) -> str:
    """Celery's ``-n`` forms: ``%h`` the host name, ``%n`` its first label, ``%d`` its
    domain, ``%p`` the pid; a name without ``@`` gets ``@<host>``."""
    host = socket.gethostname()
    short, _, domain = host.partition(".")
    name = (name.replace("%h", host).replace("%n", short).replace("%d", domain)
            .replace("%p", str(os.getpid())))
    return name if "@" in name else f"{name}@{host}"


def _running(slots: list[Slot]) -> list[str]:
    return [label for slot in slots if (label := slot.record.read()[0])]
