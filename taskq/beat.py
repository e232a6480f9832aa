"""The scheduler: fires an app's schedule (``taskq beat``, or ``taskq worker --beat``).

Any number of beats may run for one schedule, on any machines that share the broker: one is
active, the others stand by (:meth:`BeatLink.lead`: an exclusive queue on RabbitMQ, a kernel
lock on the embedded broker). A standby tries to take over every :data:`STANDBY_RETRY`
seconds, so when the active beat stops or its process dies (kill -9 included) another is
active within :data:`TAKEOVER` seconds. (A RabbitMQ beat cut off by the network holds on
until the broker misses its heartbeats: until then it can't fire either.)

Exactly one fire per due time, for the whole deployment:

* the state lives in the broker: per entry, the latest due time handled. A new active beat
  reads it and goes on from there (:func:`taskq.schedules.plan`), firing each due time that
  fell while no beat was active if it is at most :data:`~taskq.schedules.GRACE` late, else
  applying the entry's ``missed`` policy (and saying so in the log);
* a fire stores the task message and records its due time together: in one transaction on
  the embedded broker, in one publish routed to both on RabbitMQ. (On RabbitMQ a delayed
  message, or one sent by routing key, is stored first and recorded after: if its beat dies
  in between, the next beat fires it again and the workers run one copy, see ``once``.)
  Its task id is derived from the schedule, the entry and the due time
  (:func:`~taskq.schedules.fire_id`): the same whichever beat fires it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

from . import __version__
from .broker.base import BeatLink
from .errors import ConfigurationError
from .schedules import Entry, fire_id, plan

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("taskq.beat")

#: How often a standby tries to become the active beat (seconds).
STANDBY_RETRY = 0.5
#: The most a standby takes to become active once the active beat's process is gone: one
#: retry, plus reading the schedule's state.
TAKEOVER = 1.0
#: A fire the broker refused for a reason a new link won't fix (e.g. no queue bound to its
#: routing key) is tried again this much later (seconds).
RETRY_REFUSED = 5.0
#: Longest wait between two attempts to reach a broker that is away (seconds).
RECONNECT_MAX = 5.0


class Beat:
    """Fires ``app``'s schedule until :meth:`stop`: as its active beat, or standing by."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.schedule = app.config.beat_name
        if not isinstance(self.schedule, str) or not self.schedule:
            raise ConfigurationError(f"beat_name must be a non-empty string, not "
                                     f"{self.schedule!r}")
        self.entries: list[Entry] = list(app.schedule_entries.values())
        if not self.entries:
            raise ConfigurationError(
                "the app has no periodic tasks: add some with app.schedule(task.s(...), "
                "every=SECONDS) or app.schedule(task.s(...), cron='0 7 * * mon-fri')"
            )
        #: Whether this beat is the active one now.
        self.active = False
        self._stop = threading.Event()

    def stop(self) -> None:
        """Stop soon (from any thread, or a signal handler)."""
        self._stop.set()

    def describe(self) -> str:
        return "\n".join(f"{e.name}: {e.task}, {e.describe()}, missed={e.missed!r}"
                         for e in self.entries)

    # -- running -------------------------------------------------------------------------------

    def run(self) -> None:
        """Schedule until stopped, through broker outages; raise only what retrying can't fix
        (a refused login, a file that can't be used)."""
        broker = self.app.broker
        delay, away = STANDBY_RETRY, False
        while not self._stop.is_set():
            try:
                with broker.beat_link(timeout=self.app.config.publish_timeout) as link:
                    if away:
                        log.info("beat: the broker at %s is back", broker.display_url)
                    delay, away = STANDBY_RETRY, False
                    self._serve(link)
            except Exception as exc:
                self.active = False
                if not broker.is_recoverable(exc):
                    raise
                if not away:
                    log.warning("beat: the broker at %s is away (%s); trying again until it "
                                "is back", broker.display_url, broker.describe(exc))
                    away = True
                self._stop.wait(delay)
                delay = min(delay * 2, RECONNECT_MAX)
        log.info("beat: stopped")

    def _serve(self, link: BeatLink) -> None:
        """Stand by until this beat leads (or stops), then lead."""
        standing_by = False
        while not self._stop.is_set():
            if link.lead(self.schedule):
                self._lead(link, took_over=standing_by)
                return
            if not standing_by:
                log.info(
                    "beat: standby for schedule %r: another beat is active; this one takes "
                    "over within %gs of its end (if that is another app's beat, give this app "
                    "a beat_name of its own)", self.schedule, TAKEOVER)
                standing_by = True
            link.tick()
            self._stop.wait(STANDBY_RETRY)

    def _lead(self, link: BeatLink, *, took_over: bool) -> None:
        state = link.last_fired(self.schedule, [e.name for e in self.entries])
        self.active = True
        log.info("beat: %s schedule %r (%d entries)", "took over" if took_over else "active for",
                 self.schedule, len(self.entries))
        now = round(time.time(), 3)  # a first due time in whole ms: its task id names it
        for entry in self.entries:
            if entry.name not in state:  # recorded before its first fire: see Entry.anchor
                state[entry.name] = entry.anchor(now)
                link.fire(self.schedule, entry.name, state[entry.name], None)
        #: Entries whose last fire the broker refused, and when to try them again.
        held: dict[str, float] = {}
        while not self._stop.is_set():
            for entry in self.entries:
                if held.get(entry.name, 0.0) <= time.monotonic():
                    self._handle(link, entry, state, held)
            link.tick()
            self._stop.wait(self._until_next(state, held, link.tick_interval))
        self.active = False

    def _until_next(self, state: dict[str, float], held: dict[str, float], most: float) -> float:
        now, clock = time.time(), time.monotonic()
        waits = [held[e.name] - clock if e.name in held and held[e.name] > clock
                 else e.next_after(state[e.name]) - now for e in self.entries]
        return max(0.0, min(most, *waits))

    def _handle(self, link: BeatLink, entry: Entry, state: dict[str, float],
                held: dict[str, float]) -> None:
        """Fire what is due for ``entry`` (or apply its missed policy)."""
        todo = plan(entry, state[entry.name], time.time())
        try:
            if todo.missed:
                assert todo.first_missed is not None and todo.last_missed is not None
                log.warning(
                    "beat: %s missed %d due time(s), %s to %s (no beat was active, or the "
                    "broker was away); missed=%r: %s", entry.name, todo.missed,
                    entry.when(todo.first_missed), entry.when(todo.last_missed), entry.missed,
                    "firing once, late, for the latest" if entry.missed == "late" else
                    f"skipped them, next due {entry.when(entry.next_after(todo.last_missed))}")
            for due in todo.fire:
                self._fire(link, entry, due)
                state[entry.name] = due
            if todo.record is not None:
                link.fire(self.schedule, entry.name, todo.record, None)
                state[entry.name] = todo.record
            held.pop(entry.name, None)
        except Exception as exc:
            if self.app.broker.is_recoverable(exc):
                raise  # the link is gone: a new one, and leading again, decide what's next
            log.error("beat: could not fire %s (%s): %s; trying again in %gs", entry.name,
                      entry.task, exc, RETRY_REFUSED)
            held[entry.name] = time.monotonic() + RETRY_REFUSED

    def _fire(self, link: BeatLink, entry: Entry, due: float) -> None:
        task_id = fire_id(self.schedule, entry.name, due)
        when = entry.when(due)
        envelope = self.app.envelope_for(
            entry.sig, task_id=task_id, once=True,
            headers={"beat_entry": entry.name, "beat_due": when})
        link.fire(self.schedule, entry.name, due, envelope)
        late = time.time() - due
        log.info("beat: fired %s (%s[%s]) due %s%s", entry.name, entry.task, task_id, when,
                 f" (late by {late:.1f}s)" if late >= 1.0 else "")


# -- taskq beat ------------------------------------------------------------------------------


def open_link(app: App) -> BeatLink:
    """A beat link, or a one-line BrokerError if the broker can't be reached."""
    broker = app.broker
    return broker.reach(lambda: broker.beat_link(timeout=app.config.publish_timeout))


def listing(app: App) -> list[tuple[str, str, str, str, str]]:
    """The schedule, for ``taskq beat --list``: (name, task, when, last fired, next due)."""
    beat = Beat(app)
    with open_link(app) as link:
        state = link.last_fired(beat.schedule, [e.name for e in beat.entries])
    now = time.time()
    rows = []
    for entry in beat.entries:
        last = state.get(entry.name)
        if last is None:
            fired = "never"
            due = "at start" if entry.every is not None else entry.when(entry.next_after(now))
        else:
            anchor = entry.every is None and entry.next_after(last - 0.5) != last
            fired = "never" if anchor else entry.when(last)
            upcoming = entry.next_after(last)
            due = entry.when(upcoming) + (" (overdue)" if upcoming < now else "")
        rows.append((entry.name, entry.task, entry.describe(), fired, due))
    return rows


def run_beat(app: App) -> int:
    """``taskq beat``: schedule until SIGTERM/SIGINT (a second one: exit at once)."""
    runner = BeatThread(app, report=False)
    beat = runner.beat
    signals = 0

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            raise SystemExit(1)
        log.info("beat: stopping (%s)", signal.Signals(signum).name)
        beat.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    log.info("taskq beat %s (pid %d)\n  broker:   %s\n  schedule: %r\n  %s", __version__,
             os.getpid(), app.broker.location, beat.schedule,
             beat.describe().replace("\n", "\n  "))
    # The beat runs in a thread, the main thread only waits for it: a signal handler that
    # sets the beat's Event while this thread held that Event's lock would hang.
    runner.start(banner=False)
    while runner.thread.is_alive():
        runner.thread.join(0.5)
    if runner.error is not None:
        raise runner.error
    return 0


# -- taskq worker --beat ---------------------------------------------------------------------


class BeatThread:
    """A beat in a thread (of ``taskq beat``, or of the supervisor of ``taskq worker --beat``).
    ``report``: log an error that stops it (else keep it in :attr:`error`)."""

    def __init__(self, app: App, *, report: bool = True) -> None:
        self.beat = Beat(app)
        self.report = report
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._run, name="beat", daemon=True)

    def start(self, *, banner: bool = True) -> BeatThread:
        if banner:
            log.info("beat: in this worker, schedule %r:\n  %s", self.beat.schedule,
                     self.beat.describe().replace("\n", "\n  "))
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            self.beat.run()
        except Exception as exc:
            self.error = exc
            if self.report:
                log.error("beat: stopped by an error: %s", exc)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop firing (a standby elsewhere takes over); wait up to ``timeout`` for it."""
        self.beat.stop()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout)
