"""A worker's monitor: a thread of the supervisor that speaks Celery's monitoring protocols.

* It answers remote-control commands sent to every worker or to this one (its node name,
  ``taskq-<pid>@<host>`` unless ``-n`` says otherwise): ``ping``, ``stats``, ``active``,
  ``revoke`` ... (:mod:`.control`), so ``celery inspect``, Flower and ``taskq inspect`` see
  the worker.
* With events on (``-E``, or Celery's ``enable_events``) it publishes Celery's events: the
  worker's (online, a heartbeat every :data:`HEARTBEAT` seconds, offline) and its tasks', made
  from the slots' reports (:mod:`.reports`). Nothing is reported or published while events
  and metrics are off.
* It keeps the revocations: loaded from the broker at start, added to by ``revoke``
  commands, pushed to every slot (which refuses a revoked task's message).

It never holds up the slots: a broker that is away costs only the monitor, which retries.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import select
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import fields as dataclass_fields
from typing import Any, Protocol

from .. import __version__
from ..app import App
from ..broker.base import ControlLink
from ..config import mask_url
from . import control
from .outages import OutageLog
from .reports import Inbox
from .triage import SlotOptions

log = logging.getLogger("taskq.worker")

#: Seconds between worker-heartbeat events (Celery's default; Flower counts a worker offline
#: after missing about two).
HEARTBEAT = 2.0
#: Events sent in one go at most (the rest wait for the next turn).
EVENT_BATCH = 500
#: Config fields never shown by ``conf`` (their values are masked).
SECRET = ("broker_url", "ssl_key_file")


class SlotView(Protocol):
    index: int
    pid: int | None
    label: str
    started: float | None


class Supervised(Protocol):
    """What the monitor may ask of its worker (from the monitor's thread)."""

    outages: OutageLog

    def slot_views(self) -> list[Any]: ...
    def tell_slots(self, message: tuple[Any, ...]) -> None: ...
    def terminate(self, task_id: str) -> bool: ...
    def shutdown(self) -> None: ...
    def consume(self, queue: str, *, add: bool) -> dict[str, str]: ...


#: Fields of a slot's report that are not the event's.
PRIVATE_FIELDS = frozenset({"queue", "slot_pid", "args_value", "kwargs_value"})


def utcoffset() -> int:
    """Hours west of UTC, as Celery's events say it."""
    if time.daylight and time.localtime().tm_isdst:
        return time.altzone // 3600
    return time.timezone // 3600


def default_nodename() -> str:
    return f"taskq-{os.getpid()}@{socket.gethostname()}"


class Monitor:
    def __init__(self, app: App, options: SlotOptions, worker: Supervised, *, nodename: str,
                 concurrency: int, events: bool, metrics: Any = None) -> None:
        self.app = app
        #: Slots are threads (``-P threads``): a running task can't be stopped.
        self.threads = options.pool == "threads"
        self.options = options
        self.worker = worker
        self.nodename = nodename
        self.concurrency = concurrency
        self.events_enabled = events
        self.metrics = metrics
        self.queues: list[str] = list(options.queues)
        self.started = time.time()
        self.clock = 0
        self.revocations: dict[str, float] = {}
        if sys.platform.startswith("linux"):  # an abstract name: nothing left behind
            self._dir: str | None = None
            self.socket_path = f"\0taskq-monitor-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        else:
            self._dir = tempfile.mkdtemp(prefix="taskq-monitor-")
            self.socket_path = os.path.join(self._dir, "reports")
        self.inbox = Inbox(self.socket_path)
        #: Counts per slot (pid and index: thread slots share a pid), absolute.
        self._counts: dict[tuple[int, int], dict[str, Any]] = {}
        #: Args of the tasks running now, from their received reports (events on).
        self._running: dict[str, dict[str, Any]] = {}
        self._outbox: list[dict[str, Any]] = []
        #: Tasks stopped by revoke(terminate=True), whose revoked event is told already.
        self._terminated: dict[str, float] = {}
        self._stop = threading.Event()
        #: Written to by stop(): the thread's wait ends at once.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="taskq-monitor", daemon=True)
        self.link: ControlLink | None = None
        self._link_ready = threading.Event()

    # -- life ------------------------------------------------------------------------------

    def start(self, wait: float = 5.0) -> None:
        """Start; wait (bounded) until the revocations are loaded and commands are served."""
        self._thread.start()
        self._link_ready.wait(wait)

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        with _suppressed():
            os.write(self._wake_w, b"x")
        self._thread.join(timeout)
        self.inbox.close()
        for fd in (self._wake_r, self._wake_w):
            with _suppressed():
                os.close(fd)
        if self._dir is not None:
            with _suppressed():
                os.rmdir(self._dir)

    def watching(self) -> tuple[str, bool, bool]:
        """What a new slot is told first."""
        return ("watch", self.events_enabled, self.metrics is not None)

    def slot_greeting(self) -> list[tuple[Any, ...]]:
        return [self.watching(), ("revoked", dict(self.revocations))]

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        delay = 0.5
        next_beat = 0.0
        while not self._stop.is_set():
            if self.link is None:
                if not self._connect():
                    self._idle(delay)
                    delay = min(delay * 2, 10.0)
                    continue
                delay = 0.5
                next_beat = 0.0
            link = self.link
            assert link is not None
            try:
                now = time.monotonic()
                if self.events_enabled and now >= next_beat:
                    self._event("worker-heartbeat", **self._beat_fields())
                    next_beat = now + HEARTBEAT
                self._flush()
                until_beat = max(0.0, next_beat - now) if self.events_enabled else 1.0
                self._wait(link, min(link.tick_interval, until_beat, 1.0))
                link.drain()
                for command in link.commands():
                    self._command(link, command)
                self._take_reports()
                link.tick()
            except Exception as exc:
                log.warning("worker monitor: lost its broker link (%s); retrying",
                            self.app.broker.describe(exc))
                self._drop()
        self._offline()

    def _connect(self) -> bool:
        broker = self.app.broker
        link: ControlLink | None = None
        try:
            link = broker.control_link(timeout=self.app.config.connect_timeout,
                                       name=f"taskq worker {self.nodename} monitor")
            link.serve(self.nodename)
            stored = link.revoked()
        except Exception as exc:
            if link is not None:  # half set up: it must not go on taking this node's commands
                with _suppressed():
                    link.close()
            if not broker.is_recoverable(exc):
                log.error("worker monitor: can't serve remote control: %s", exc)
            self._link_ready.set()
            return False
        self.link = link
        self._add_revoked(stored)
        self._link_ready.set()
        if self.events_enabled:
            self._event("worker-online", **self._beat_fields())
        return True

    def _drop(self) -> None:
        link, self.link = self.link, None
        if link is not None:
            with _suppressed():
                link.close()

    def _idle(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            self._wait(None, min(0.5, deadline - time.monotonic()))
            self._take_reports()

    def _wait(self, link: ControlLink | None, timeout: float) -> None:
        if self._stop.is_set():
            return
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        for fd in self.inbox.filenos():
            poller.register(fd, select.POLLIN)
        if link is not None:
            if link.input.buffered():
                return
            poller.register(link.input.fileno(), select.POLLIN)
        poller.poll(max(0, int(timeout * 1000)))

    def _offline(self) -> None:
        if self.link is None:
            return
        try:
            self._take_reports()
            if self.events_enabled:
                self._event("worker-offline", **self._beat_fields())
            self._flush()
        except Exception as exc:
            log.debug("worker monitor: could not say goodbye: %s", exc)
        self._drop()

    # -- commands --------------------------------------------------------------------------

    def _command(self, link: ControlLink, command: dict[str, Any]) -> None:
        """Answer one command; a malformed one is answered with an error or ignored, never
        the end of the link (only the broker's own errors are)."""
        destination = command.get("destination")
        if isinstance(destination, str):
            destination = [destination]
        if destination and (not isinstance(destination, list)
                            or self.nodename not in destination):
            return
        method = command.get("method")
        arguments = command.get("arguments")
        self.clock += 1
        value = control.handle(self, method if isinstance(method, str) else "",
                               arguments if isinstance(arguments, dict) else {})
        log.debug("remote control: %s -> %.200r", method, value)
        try:
            link.answer(command, self.nodename, value)
        except Exception as exc:
            if self.app.broker.is_recoverable(exc):
                raise
            log.warning("worker monitor: could not answer %.100r: %s", method, exc)

    # -- what the handlers ask -------------------------------------------------------------

    def totals(self) -> dict[str, int]:
        return self._sum("total")

    def by_queue(self) -> dict[str, int]:
        return self._sum("queues")

    def outcomes(self) -> dict[str, int]:
        return self._sum("outcomes")

    def processed(self) -> int:
        return sum(self.totals().values())

    def _sum(self, key: str) -> dict[str, int]:
        found: dict[str, int] = {}
        for counts in list(self._counts.values()):
            for name, n in (counts.get(key) or {}).items():
                found[name] = found.get(name, 0) + int(n)
        return found

    def worker_reconnects(self) -> int:
        return int(self.worker.outages.reconnects)

    def slot_pids(self) -> list[int]:
        return [view.pid for view in self.worker.slot_views() if view.pid]

    def active(self, safe: bool = False) -> list[dict[str, Any]]:
        """The tasks running now, in Celery's request shape: arguments as values (reprs
        when ``safe``, or too big to pass on, or run while no one watched)."""
        found = []
        for view in self.worker.slot_views():
            if not view.label or not view.label.endswith("]") or "[" not in view.label:
                continue
            name, _, rest = view.label.partition("[")
            task_id = rest[:-1]
            seen = self._running.get(task_id) or _recorded_arguments(view.arguments)
            found.append({
                "id": task_id, "name": name, "type": name,
                "args": seen.get("args", "") if safe else seen.get("args_value",
                                                                    seen.get("args", [])),
                "kwargs": seen.get("kwargs", "") if safe else seen.get(
                    "kwargs_value", seen.get("kwargs", {})),
                "hostname": self.nodename, "time_start": view.started,
                "acknowledged": False, "worker_pid": view.pid,
                "delivery_info": {"exchange": seen.get("exchange", ""),
                                  "routing_key": seen.get("routing_key", ""),
                                  "priority": 0, "redelivered": False},
            })
        return found

    def broker_info(self) -> dict[str, Any]:
        return {"transport": self.app.config.broker_url.split(":", 1)[0],
                "hostname": self.app.broker.display_url}

    def masked_conf(self) -> dict[str, Any]:
        config = self.app.config
        found: dict[str, Any] = {}
        for field in dataclass_fields(config):
            value = getattr(config, field.name)
            if field.name == "broker_url":
                value = config.display_url
            elif field.name == "management_url" and value:
                value = mask_url(value)
            elif field.name in SECRET and value:
                value = "********"
            found[field.name] = value if isinstance(value, (str, int, float, bool, type(None))) \
                else repr(value)
        return found

    def set_events(self, enabled: bool) -> None:
        if enabled == self.events_enabled:
            return
        self.events_enabled = enabled
        self.worker.tell_slots(self.watching())
        log.info("task events %s (remote control)", "enabled" if enabled else "disabled")
        if enabled:
            self._event("worker-online", **self._beat_fields())

    def revoke(self, task_ids: Sequence[str], *, terminate: bool, stored: bool) -> list[str]:
        """Refuse these tasks from now on; with ``terminate``, stop their runs under way
        (the ids of those stopped)."""
        until = time.time() + self.app.config.revoke_expires
        if not stored and self.link is not None:
            try:
                self.link.store_revoked(task_ids, until)
            except Exception as exc:  # still refused here; others hear it from the broadcast
                log.warning("could not keep revocations in the broker: %s", exc)
        self._add_revoked(dict.fromkeys(task_ids, until))
        shown = ", ".join(task_ids[:5]) + (f" and {len(task_ids) - 5} more"
                                           if len(task_ids) > 5 else "")
        log.info("revoked: %s%s", shown, " (terminate)" if terminate else "")
        stopped: list[str] = []
        if terminate:
            self._take_reports()  # its received and started go out before its end
            for task_id in task_ids:
                if self.worker.terminate(task_id):
                    stopped.append(task_id)
                    self._event("task-revoked", uuid=task_id, terminated=True,
                                signum="SIGKILL", expired=False)
                    # its message comes back to a slot, which refuses it: told once here
                    self._terminated[task_id] = time.monotonic()
        return stopped

    def _add_revoked(self, found: dict[str, float]) -> None:
        now = time.time()
        with self._lock:
            self.revocations = {k: v for k, v in {**self.revocations, **found}.items()
                                if v >= now}
        if found:
            self.worker.tell_slots(("revoked", found))

    # -- reports and events ----------------------------------------------------------------

    def _take_reports(self) -> None:
        for report in self.inbox.take():
            kind = report.pop("kind", None)
            if kind == "counts":
                with _suppressed():
                    self._counts[int(report.get("pid") or 0), int(report.get("slot") or 0)] \
                        = report
            elif kind == "event":
                self._on_task_event(report)

    def _on_task_event(self, report: dict[str, Any]) -> None:
        started = report.pop("started", False)
        self._on_task_step(report)
        if started is True:  # a slot's one report of a run's start: received, then started
            self._on_task_step({"type": "task-started", "uuid": report.get("uuid"),
                                "name": report.get("name"), "queue": report.get("queue"),
                                "timestamp": report.get("timestamp"),
                                "slot_pid": report.get("slot_pid")})

    def _on_task_step(self, report: dict[str, Any]) -> None:
        kind = str(report.get("type"))
        task_id = str(report.get("uuid"))
        if kind == "task-received":
            self._running[task_id] = report
            if len(self._running) > 10_000:
                self._running.clear()
        elif kind != "task-started":
            self._running.pop(task_id, None)
        if self.metrics is not None:
            self.metrics.observe(report)
        if kind == "task-revoked" and self._terminated.pop(task_id, None) is not None:
            return
        if len(self._terminated) > 1000:  # told long ago, never came back: forget them
            now = time.monotonic()
            self._terminated = {k: t for k, t in self._terminated.items() if now - t < 600}
        if self.events_enabled:
            event = {k: v for k, v in report.items() if k not in PRIVATE_FIELDS}
            if kind != "task-received":
                event.pop("name", None)
            if kind == "task-started":
                event["pid"] = report.get("slot_pid")
            self._outbox.append(self._stamp(event))

    def _beat_fields(self) -> dict[str, Any]:
        running = sum(1 for view in self.worker.slot_views() if view.label)
        try:
            load = [round(x, 2) for x in os.getloadavg()]
        except OSError:
            load = [0.0, 0.0, 0.0]
        return {"freq": HEARTBEAT, "active": running, "processed": self.processed(),
                "loadavg": load, "sw_ident": "taskq", "sw_ver": __version__,
                "sw_sys": platform.system()}

    def _event(self, kind: str, **fields: Any) -> None:
        if self.events_enabled:
            self._outbox.append(self._stamp({"type": kind, "timestamp": time.time(), **fields}))

    def _stamp(self, event: dict[str, Any]) -> dict[str, Any]:
        self.clock += 1
        event.setdefault("timestamp", time.time())
        event.update(hostname=self.nodename, utcoffset=utcoffset(), pid=event.get("pid")
                     or os.getpid(), clock=self.clock)
        return event

    def _flush(self) -> None:
        if not self._outbox or self.link is None:
            return
        batch, self._outbox = self._outbox[:EVENT_BATCH], self._outbox[EVENT_BATCH:]
        try:
            self.link.send_events(batch)
        except Exception:
            if len(self._outbox) > 50_000:  # a broker away for long: drop the oldest
                del self._outbox[:10_000]
            self._outbox[:0] = batch
            raise


class _suppressed:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def _recorded_arguments(text: str) -> dict[str, Any]:
    """The arguments of a task run while no one watched, from its run record: values when
    the record holds the whole body, else the start of it as a repr."""
    if not text:
        return {}
    try:
        args, kwargs = json.loads(text)[:2]
    except (ValueError, TypeError, KeyError):
        return {"args": text + "...", "kwargs": ""}
    return {"args": repr(args), "kwargs": repr(kwargs), "args_value": args,
            "kwargs_value": kwargs}
