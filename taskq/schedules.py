"""Periodic tasks: what is due when. Pure: no broker, no clock of its own.

An app's schedule is a set of :class:`Entry` (``app.schedule(sig, every=...)`` or
``app.schedule(sig, cron="0 7 * * mon-fri", tz="Europe/Berlin")``). The broker keeps, per
entry, one number: the latest due time handled (fired, or skipped by the missed policy).
Everything else follows from it:

* ``every=S``: due times form a grid ``last + k*S``. An entry with nothing recorded fires at
  once when its schedule starts (as Celery's beat does), and the grid is anchored there.
* ``cron=...``: due times are the expression's times in ``tz`` (default UTC), as
  `cronsim <https://github.com/cuu508/cronsim>`_ defines them, DST included: a time that a
  spring-forward skips fires when the clock jumps over it; a fixed time in the hour that
  autumn repeats fires once (an hourly or every-minute one fires in both copies of the hour).
  An entry with nothing recorded first fires at the expression's next time.

What to fire now (:func:`plan`): due times the scheduler reaches within :data:`GRACE` of
their time (a standby taking over, a slow broker) are each fired, late by that much. If it
reaches one later than that, no beat was active over them: the entry's ``missed`` policy
decides, for all the due times passed since the last one handled: ``"late"`` fires once, for
the latest of them; ``"skip"`` fires none. Either way the log says how many.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any, Literal

from .canvas import Signature
from .errors import ConfigurationError

Missed = Literal["late", "skip"]
MISSED: tuple[Missed, ...] = ("late", "skip")

#: A due time reached at most this late (seconds) is fired as usual: longer than a standby
#: takes to take over (see :data:`taskq.beat.TAKEOVER`). One reached later was missed.
GRACE = 2.0
#: The most due times of a cron entry counted one by one when a beat was down a long time.
COUNT_LIMIT = 100_000
CRON_EXTRA = "cron schedules need the cron extra: pip install 'taskq[cron]'"
#: Shorthands, as cron(8) knows them.
CRON_ALIASES = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
#: Fire ids: version 5 UUIDs in a namespace of taskq's own.
FIRE_NAMESPACE = uuid.UUID("6d1f0c2e-5b1a-4f4e-9a57-7461736b7162")


def fire_id(schedule: str, entry: str, due: float) -> str:
    """The task id of the fire of ``entry`` for ``due``: the same in every beat process, so a
    fire stored twice (a beat killed between storing it and recording it) runs once."""
    return str(uuid.uuid5(FIRE_NAMESPACE, f"{schedule}\n{entry}\n{round(due * 1000)}"))


@dataclass(frozen=True, eq=False)
class Entry:
    """One line of a schedule: a signature, and when it is due."""

    name: str
    sig: Signature
    every: float | None = None
    cron: str | None = None
    tz: str = "UTC"
    missed: Missed = "late"
    zone: tzinfo = field(default=timezone.utc, repr=False, compare=False)

    @property
    def task(self) -> str:
        return self.sig.name

    def describe(self) -> str:
        """``every 0.5s`` or ``cron '0 7 * * mon-fri' (Europe/Berlin)``."""
        if self.every is not None:
            return f"every {self.every:g}s"
        return f"cron {self.cron!r} ({self.tz})"

    def when(self, moment: float) -> str:
        """A due time for people: ISO 8601 in the entry's time zone (UTC for ``every``)."""
        return datetime.fromtimestamp(moment, self.zone).isoformat(timespec="milliseconds")

    def anchor(self, now: float) -> float:
        """What to record for an entry with nothing recorded, before anything is fired: a
        standby that takes over then computes the same first due time."""
        if self.every is not None:
            return now - self.every  # its first due time is now
        return now

    def next_after(self, last: float) -> float:
        """The first due time after ``last``."""
        if self.every is not None:
            return last + self.every
        return next(_cron_times(self, last))

    def latest_until(self, now: float) -> float:
        """The last cron time at or before ``now``."""
        from cronsim import CronSim

        start = datetime.fromtimestamp(now, self.zone) + timedelta(microseconds=1)
        return next(CronSim(self._expression, start, reverse=True)).timestamp()

    @property
    def _expression(self) -> str:
        assert self.cron is not None
        return CRON_ALIASES.get(self.cron.strip().lower(), self.cron)


def _cron_times(entry: Entry, after: float) -> Iterator[float]:
    from cronsim import CronSim

    start = datetime.fromtimestamp(after, entry.zone)
    return (moment.timestamp() for moment in CronSim(entry._expression, start))


@dataclass(frozen=True)
class Plan:
    """What to do for one entry now."""

    #: Due times to fire now, in order (each is recorded as it is fired).
    fire: tuple[float, ...] = ()
    #: A due time to record without firing it (the missed ones, skipped).
    record: float | None = None
    #: How many due times were missed (reached later than GRACE), with the first and last.
    missed: int = 0
    first_missed: float | None = None
    last_missed: float | None = None


NOTHING = Plan()


def plan(entry: Entry, last: float, now: float, grace: float = GRACE) -> Plan:
    """What to fire for ``entry`` at ``now``, given the latest due time handled, ``last``."""
    first = entry.next_after(last)
    if first > now:
        return NOTHING
    if entry.every is not None:
        count = max(1, math.floor((now - last) / entry.every))
        while count > 1 and last + count * entry.every > now:  # float rounding
            count -= 1
        latest = last + count * entry.every
        times: list[float] = [last + k * entry.every for k in range(1, count + 1)] \
            if first >= now - grace else []
    else:
        times = []
        for moment in _cron_times(entry, last):
            if moment > now or len(times) >= COUNT_LIMIT:
                break
            times.append(moment)
        count, latest = len(times), times[-1]
        if count >= COUNT_LIMIT:
            latest = entry.latest_until(now)
    if first >= now - grace:
        return Plan(fire=tuple(times))
    if entry.missed == "late":
        return Plan(fire=(latest,), missed=count, first_missed=first, last_missed=latest)
    return Plan(record=latest, missed=count, first_missed=first, last_missed=latest)


# -- checking what app.schedule() was given ------------------------------------------------------


def make_entry(
    sig: Any,
    *,
    every: float | None,
    cron: str | None,
    tz: str | None,
    name: str | None,
    missed: str,
) -> Entry:
    """An Entry from ``app.schedule``'s arguments, or a one-line ConfigurationError."""
    signature = _signature(sig)
    if (every is None) == (cron is None):
        raise ConfigurationError(
            "app.schedule() needs exactly one of every=SECONDS or cron='MIN HOUR DAY MONTH "
            "WEEKDAY' (e.g. every=60 or cron='0 7 * * mon-fri')"
        )
    if missed not in MISSED:
        raise ConfigurationError(
            f"app.schedule(missed={missed!r}): missed must be 'late' (fire once, late, for "
            "the latest due time missed) or 'skip' (fire none of them)"
        )
    entry_name = signature.name if name is None else name
    if not isinstance(entry_name, str) or not entry_name:
        raise ConfigurationError(f"app.schedule(name={name!r}): name must be a non-empty string")
    if every is not None:
        if tz is not None:
            raise ConfigurationError(
                f"app.schedule(tz={tz!r}): a time zone applies to cron= schedules; every= "
                "counts seconds"
            )
        return Entry(entry_name, signature, every=_seconds(every), missed=missed)
    zone = _zone(tz or "UTC")
    return Entry(entry_name, signature, cron=_check_cron(cron, zone), tz=tz or "UTC",
                 missed=missed, zone=zone)


def _signature(sig: Any) -> Signature:
    from .task import Task

    if isinstance(sig, Task):
        return sig.s()
    if isinstance(sig, Mapping) and sig.get("subtask_type"):
        raise ConfigurationError(
            f"app.schedule() sends one task: {sig!r} is a {sig.get('subtask_type')}; schedule "
            "a task that sends it instead"
        )
    if isinstance(sig, Signature):
        return sig
    if isinstance(sig, Mapping) and isinstance(sig.get("task"), str) and sig["task"]:
        return Signature(sig)
    raise ConfigurationError(
        f"app.schedule() takes a signature, e.g. app.schedule(cleanup.s(days=30), every=3600), "
        f"not {sig!r}"
    )


def _seconds(every: Any) -> float:
    valid = isinstance(every, (int, float)) and not isinstance(every, bool) \
        and math.isfinite(every) and every >= 0.001
    if not valid:
        raise ConfigurationError(
            f"app.schedule(every={every!r}): every must be a number of seconds > 0 "
            "(at least 0.001)"
        )
    return float(every)


def _zone(tz: Any) -> tzinfo:
    from zoneinfo import ZoneInfo

    try:
        if not isinstance(tz, str) or not tz:
            raise ValueError(tz)
        return ZoneInfo(tz)
    except (ValueError, OSError, LookupError):  # ZoneInfoNotFoundError is a KeyError
        from zoneinfo import available_timezones

        if not available_timezones():  # no tz database here (Windows, a slim container)
            raise ConfigurationError(
                f"app.schedule(tz={tz!r}): this machine has no time zone database: "
                "pip install tzdata"
            ) from None
        raise ConfigurationError(
            f"app.schedule(tz={tz!r}): not a time zone; use an IANA name such as "
            "'Europe/Berlin' or 'UTC'"
        ) from None


def _check_cron(cron: Any, zone: tzinfo) -> str:
    try:
        from cronsim import CronSim, CronSimError
    except ImportError:
        raise ConfigurationError(CRON_EXTRA) from None
    if not isinstance(cron, str):
        raise ConfigurationError(f"app.schedule(cron={cron!r}): cron must be a string")
    expression = CRON_ALIASES.get(cron.strip().lower(), cron)
    try:
        next(CronSim(expression, datetime.now(zone)))
    except (CronSimError, StopIteration) as exc:
        raise ConfigurationError(
            f"app.schedule(cron={cron!r}): not a cron expression ({exc or 'never due'}); "
            "write MINUTE HOUR DAY MONTH WEEKDAY, e.g. '0 7 * * mon-fri' or '*/15 * * * *'"
        ) from None
    return cron
