"""Routes: which queue a task goes to when neither the call nor the task names one.

``App(routes={"images.*": "images", "reports.daily": {"queue": "reports"}})``: each key is a
glob pattern on task names (``fnmatch`` rules, case-sensitive: ``*``, ``?``, ``[abc]``), each
value a queue name or ``{"queue": name}``. The first pattern that matches wins, in the order
given. ``apply_async(queue=...)`` wins over a task's own ``queue=``, which wins over routes;
a task no route matches goes to the app's ``default_queue``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from typing import Any

from .errors import ConfigurationError

#: Keys a route given as a mapping may have.
ROUTE_KEYS = frozenset({"queue"})


class Router:
    def __init__(self, routes: Mapping[str, str | Mapping[str, Any]]) -> None:
        if not isinstance(routes, Mapping):
            raise ConfigurationError(
                f"routes must be a mapping of task-name patterns to queues, not {routes!r}"
            )
        self._routes: list[tuple[re.Pattern[str], str]] = [
            (re.compile(fnmatch.translate(_pattern(p))), _queue(p, v)) for p, v in routes.items()
        ]
        #: Task name → queue (or None), once looked up: patterns are tried once per name.
        self._chosen: dict[str, str | None] = {}

    def __bool__(self) -> bool:
        return bool(self._routes)

    def queue_for(self, task_name: str) -> str | None:
        """The queue of the first route matching ``task_name``, or None."""
        if not self._routes:
            return None
        try:
            return self._chosen[task_name]
        except KeyError:
            pass
        chosen = next((q for pattern, q in self._routes if pattern.match(task_name)), None)
        if len(self._chosen) < 10_000:  # names sent by name could be anything: stay bounded
            self._chosen[task_name] = chosen
        return chosen


def _pattern(pattern: object) -> str:
    if not isinstance(pattern, str) or not pattern:
        raise ConfigurationError(
            f"a route's key must be a task-name pattern such as 'images.*', not {pattern!r}"
        )
    return pattern


def _queue(pattern: str, value: object) -> str:
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - ROUTE_KEYS)
        if unknown:
            raise ConfigurationError(
                f"route {pattern!r}: unknown key(s) {', '.join(map(str, unknown))} "
                f"(known: {', '.join(sorted(ROUTE_KEYS))})"
            )
        value = value.get("queue")
    if not isinstance(value, str) or not value:
        raise ConfigurationError(
            f"route {pattern!r} must name a queue: 'queue-name' or {{'queue': 'queue-name'}}, "
            f"not {value!r}"
        )
    return value
