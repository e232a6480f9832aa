"""Rate limits: ``@app.task(rate_limit="100/m")`` runs the task at most once per interval
(here 0.6 s), as Celery's do: evenly spaced, no bursts.

* ``rate_limit_scope="worker"`` (the default, as Celery): per ``taskq worker``, shared by its
  slots; ``"global"``: shared by every worker of the broker.
* The broker decides (:meth:`taskq.broker.base.SlotLink.admit`), so the limit holds across
  processes and outlives any of them. A message that may not start yet goes back to the
  broker, delayed, and the slot takes other work: it waits in the broker, not in a slot.
* :class:`Pacer` spreads those delays: each message a slot puts back gets the next interval
  that slot has not yet promised, so a backlog comes back one message per interval instead
  of all at once (a message that still finds the interval taken goes back again).
"""

from __future__ import annotations

import re
import time

from .errors import ConfigurationError

SCOPES = ("worker", "global")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*([smh])\s*$")


def interval_of(rate_limit: str | float | int) -> float:
    """Seconds between two starts for a rate such as ``"100/m"``, ``"10/s"``, ``"5/h"`` or a
    number per second; a one-line error for anything else."""
    count, unit = None, "s"
    if isinstance(rate_limit, (int, float)) and not isinstance(rate_limit, bool):
        count = float(rate_limit)
    elif isinstance(rate_limit, str) and (found := _RATE.match(rate_limit)):
        count, unit = float(found.group(1)), found.group(2)
    if count is None or count <= 0:
        raise ConfigurationError(
            f"rate_limit must be a positive rate such as '100/m', '10/s', '5/h' or a number "
            f"per second, not {rate_limit!r}"
        )
    return _UNITS[unit] / count


def check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ConfigurationError(
            f"rate_limit_scope must be one of {', '.join(SCOPES)}, not {scope!r}"
        )
    return scope


class Pacer:
    """When to try again, for the messages one slot puts back: one interval apart."""

    def __init__(self) -> None:
        self._promised: dict[str, float] = {}

    def later(self, key: str, interval: float) -> float:
        """Seconds from now until the next interval of ``key`` not yet promised."""
        now = time.monotonic()
        promised = max(now, self._promised.get(key, now)) + interval
        self._promised[key] = promised
        return promised - now
