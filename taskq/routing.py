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
from dataclasses import dataclass
from typing import Any

from .errors import ConfigurationError

#: Where topic sends go on RabbitMQ. A signature that is sent by routing key names it in its
#: options (``exchange``), as Celery's do, so that a Celery worker sending it routes it alike.
TOPIC_EXCHANGE = "taskq.topic"

#: Keys a route given as a mapping may have.
ROUTE_KEYS = frozenset({"queue", "routing_key"})
#: The longest routing key or binding pattern (AMQP's short string).
MAX_KEY_BYTES = 255


class Router:
    def __init__(self, routes: Mapping[str, str | Mapping[str, Any]]) -> None:
        if not isinstance(routes, Mapping):
            raise ConfigurationError(
                f"routes must be a mapping of task-name patterns to queues, not {routes!r}"
            )
        self._routes: list[tuple[re.Pattern[str], Route]] = [
            (re.compile(fnmatch.translate(_pattern(p))), _route(p, v)) for p, v in routes.items()
        ]
        #: Task name → route (or None), once looked up: patterns are tried once per name.
        self._chosen: dict[str, Route | None] = {}

    def __bool__(self) -> bool:
        return bool(self._routes)

    def queue_for(self, task_name: str) -> str | None:
        """The queue of the first route matching ``task_name``, or None."""
        route = self.route_for(task_name)
        return route.queue if route is not None else None

    def route_for(self, task_name: str) -> Route | None:
        """The first route matching ``task_name``, or None."""
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


@dataclass(frozen=True)
class Route:
    """Where a route sends a task: a queue, or a routing key (then ``queue`` is None)."""

    queue: str | None = None
    routing_key: str | None = None


def _route(pattern: str, value: object) -> Route:
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - ROUTE_KEYS)
        if unknown:
            raise ConfigurationError(
                f"route {pattern!r}: unknown key(s) {', '.join(map(str, unknown))} "
                f"(known: {', '.join(sorted(ROUTE_KEYS))})"
            )
        if "routing_key" in value and "queue" not in value:
            return Route(routing_key=check_routing_key(value["routing_key"]))
        value = value.get("queue")
    if not isinstance(value, str) or not value:
        raise ConfigurationError(
            f"route {pattern!r} must name a queue: 'queue-name', {{'queue': 'queue-name'}} or "
            f"{{'routing_key': 'a.b.c'}}, not {value!r}"
        )
    return Route(queue=value)


def check_routing_key(key: object) -> str:
    """A routing key as given, or a one-line error."""
    return _short_string(key, "routing_key must be", "'eu.orders.created'")


def check_binding(pattern: object) -> str:
    """A binding pattern (words separated by dots; ``*`` one word, ``#`` any number)."""
    return _short_string(pattern, "a binding pattern must be", "'eu.orders.*' or 'eu.#'")


def _short_string(value: object, what: str, example: str) -> str:
    if not isinstance(value, str) or not value or len(value.encode()) > MAX_KEY_BYTES:
        raise ConfigurationError(
            f"{what} a non-empty string of at most {MAX_KEY_BYTES} bytes, such as {example}, "
            f"not {value!r}"
        )
    return value


def topic_matches(pattern: str, key: str) -> bool:
    """Whether ``key`` matches ``pattern`` under RabbitMQ's topic rules: words separated by
    dots, ``*`` stands for exactly one word, ``#`` for zero or more."""
    words, keys = pattern.split("."), key.split(".")
    # reach[j]: the pattern so far can match the first j words of the key
    reach = [True] + [False] * len(keys)
    for word in words:
        if word == "#":
            for j in range(1, len(keys) + 1):
                reach[j] = reach[j] or reach[j - 1]
        else:
            reach = [False] + [reach[j - 1] and (word == "*" or word == keys[j - 1])
                               for j in range(1, len(keys) + 1)]
    return reach[-1]


def signature_destination(options: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(queue, routing key) a signature's options ask for, read as Celery's: a routing key
    through taskq's topic exchange (or through none named, and no queue) is a topic send;
    through any other exchange (Celery's default ``""``, or a queue's own direct exchange)
    it names the queue it goes to."""
    queue = options.get("queue")
    queue = queue if isinstance(queue, str) and queue else None
    key = options.get("routing_key")
    if not isinstance(key, str) or not key:
        return queue, None
    exchange = options.get("exchange")
    if queue is None and (exchange is None or exchange == TOPIC_EXCHANGE):
        return None, key
    return queue or key, None
