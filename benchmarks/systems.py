"""The systems under test, behind one small surface: a place, a worker command and a client.

On RabbitMQ (one vhost each): ``taskq``, the py-amqp ``floor`` and ``celery``. Embedded (one
SQLite file each, no broker process): ``taskq-embedded`` (taskq's default broker),
``taskq-embedded-full`` (the same at ``synchronous=full``) and ``huey`` (``SqliteHuey``).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .broker import Vhost
from .embedded import HueyFile, TaskqFile
from .places import Place

SLOTS = 2
#: Huey's polling interval (seconds), in its consumer (``-d``/``-m``, backoff 1) and in
#: ``Result.get(max_delay=...)``: see huey_argv and the README for why 1 ms.
HUEY_POLL = 0.001


class Result(Protocol):
    def get(self, timeout: float | None = ...) -> Any: ...


class Client(Protocol):
    #: What ``Result.get`` raises when its timeout passes.
    timeout_errors: tuple[type[BaseException], ...]

    def delay(self, x: int, y: int) -> Result: ...

    def bulk(self, arg_tuples: list[tuple[int, int]]) -> bool:
        """Enqueue all of them; False if the system has no bulk API (reported as n/a)."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class System:
    name: str
    #: Where its messages live, given a name unique to the run (see places.py).
    place: Callable[[str], Place]
    #: What ``place.wait_ready`` counts once the worker is fully up: consumers on RabbitMQ,
    #: slot processes on the embedded systems.
    ready_count: int
    #: What the bulk-enqueue figure measures for this system.
    bulk_method: str
    worker_argv: Callable[[str, str], list[str]]
    #: Environment for the worker process, given the broker URL.
    worker_env: Callable[[str], dict[str, str]]
    client: Callable[[str, str], Client]



# -- taskq ----------------------------------------------------------------------------------------


class TaskqClient:
    timeout_errors: tuple[type[BaseException], ...] = (TimeoutError,)  # taskq.TimeoutError too

    def __init__(self, url: str, queue: str) -> None:
        from .taskq_tasks import make_app

        self.app, self.add = make_app(url, queue)

    def delay(self, x: int, y: int) -> Result:
        return self.add.delay(x, y)  # type: ignore[no-any-return]

    def bulk(self, arg_tuples: list[tuple[int, int]]) -> bool:
        delay_many = getattr(self.add, "delay_many", None)
        if delay_many is None:
            return False
        delay_many(arg_tuples)
        return True

    def close(self) -> None:
        self.app.close()


def taskq_argv(url: str, queue: str) -> list[str]:
    app = "benchmarks.taskq_tasks:app"
    return [sys.executable, "-m", "taskq", "worker", "-A", app, "-Q", queue, "-c", str(SLOTS)]


def taskq_events_argv(url: str, queue: str) -> list[str]:
    """The same worker publishing Celery's events (``-E``), with no one listening."""
    return [*taskq_argv(url, queue), "-E"]


# -- the floor -----------------------------------------------------------------------------------


class FloorClientAdapter:
    timeout_errors: tuple[type[BaseException], ...] = (TimeoutError,)

    def __init__(self, url: str, queue: str) -> None:
        from .floor import FloorClient

        self.client = FloorClient(url, queue)

    def delay(self, x: int, y: int) -> Result:
        return self.client.delay(x, y)

    def bulk(self, arg_tuples: list[tuple[int, int]]) -> bool:
        self.client.delay_many(arg_tuples)
        return True

    def close(self) -> None:
        self.client.close()


def floor_argv(url: str, queue: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.floor", url, queue, "-c", str(SLOTS)]


# -- Celery ---------------------------------------------------------------------------------------


class CeleryClient:
    def __init__(self, url: str, queue: str) -> None:
        from celery.exceptions import TimeoutError as CeleryTimeout

        from .celery_tasks import make_app

        self.app, self.add = make_app(url, queue)
        self.timeout_errors: tuple[type[BaseException], ...] = (TimeoutError, CeleryTimeout)

    def delay(self, x: int, y: int) -> Result:
        return self.add.delay(x, y)  # type: ignore[no-any-return]

    def bulk(self, arg_tuples: list[tuple[int, int]]) -> bool:
        for x, y in arg_tuples:
            self.add.delay(x, y)
        return True

    def close(self) -> None:
        self.app.close()


def celery_argv(url: str, queue: str) -> list[str]:
    celery = [sys.executable, "-m", "celery", "-A", "benchmarks.celery_tasks:app", "worker"]
    return [
        *celery,
        "-P", "prefork", "-c", str(SLOTS), "-Q", queue, "-l", "WARNING",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip


# -- Huey ----------------------------------------------------------------------------------------


class HueyResult:
    def __init__(self, result: Any, poll: float) -> None:
        self.result = result
        self.poll = poll

    def get(self, timeout: float | None = None) -> Any:
        # Huey polls its result store: first after 50 ms, then growing by ``backoff`` up to
        # ``max_delay``. Backoff 1 and max_delay = the poll interval: a look every interval.
        return self.result.get(blocking=True, timeout=timeout, backoff=1, max_delay=self.poll)


class HueyClient:
    def __init__(self, path: str, queue: str, poll: float = HUEY_POLL) -> None:
        from huey.exceptions import ResultTimeout

        from .huey_tasks import make_huey

        self.huey, self.add = make_huey(path, queue)
        self.poll = poll
        self.timeout_errors: tuple[type[BaseException], ...] = (TimeoutError, ResultTimeout)

    def delay(self, x: int, y: int) -> Result:
        return HueyResult(self.add(x, y), self.poll)

    def bulk(self, arg_tuples: list[tuple[int, int]]) -> bool:
        self.add.map(arg_tuples)  # Huey's many-at-once API: an enqueue (a commit) per task
        return True

    def close(self) -> None:
        self.huey.storage.close()


def huey_argv(url: str, queue: str, poll: float = HUEY_POLL) -> list[str]:
    """2 worker processes polling the file every ``poll`` s when idle (backoff 1: never
    slower), none between tasks while busy; no periodic tasks, warnings only (Huey logs
    every task at INFO). SIGTERM stops Huey's consumer at once (its warm stop is SIGINT):
    the suite stops a worker only between phases, with nothing running."""
    consumer = [sys.executable, "-m", "huey.bin.huey_consumer", "benchmarks.huey_tasks.huey"]
    return [
        *consumer, "-w", str(SLOTS), "-k", "process",
        "-d", str(poll), "-m", str(poll), "-b", "1", "-n", "-q",
    ]  # fmt: skip


def taskq_env(url: str) -> dict[str, str]:
    return {"TASKQ_BROKER_URL": url}


def taskq_embedded(name: str, synchronous: str, events: bool = False) -> System:
    """taskq on its embedded broker: the same worker and client, given a sqlite:// URL."""
    return System(
        name=name,
        place=functools.partial(TaskqFile, synchronous=synchronous),
        ready_count=SLOTS,
        bulk_method="delay_many (one transaction)",
        worker_argv=taskq_events_argv if events else taskq_argv,
        worker_env=taskq_env,
        client=TaskqClient,
    )


def huey_system(poll: float) -> System:
    return System(
        name="huey",
        place=HueyFile,
        ready_count=SLOTS,
        bulk_method="add.map() (a loop of enqueues inside Huey: a commit each)",
        worker_argv=functools.partial(huey_argv, poll=poll),
        worker_env=lambda path: {"BENCH_HUEY_FILE": path},
        client=functools.partial(HueyClient, poll=poll),
    )


def taskq_rabbitmq(name: str, events: bool = False) -> System:
    """taskq on RabbitMQ, each run in a vhost of its own."""
    return System(
        name=name,
        place=Vhost,
        ready_count=SLOTS,
        bulk_method="delay_many (pipelined confirms)",
        worker_argv=taskq_events_argv if events else taskq_argv,
        worker_env=taskq_env,
        client=TaskqClient,
    )


RABBITMQ_SYSTEMS = [
    taskq_rabbitmq("taskq"),
    taskq_rabbitmq("taskq-events", events=True),
    System(
        name="floor",
        place=Vhost,
        ready_count=SLOTS,
        bulk_method="pipelined confirms",
        worker_argv=floor_argv,
        worker_env=lambda url: {},
        client=FloorClientAdapter,
    ),
    System(
        name="celery",
        place=Vhost,
        # One consumer per worker: prefetch = multiplier (1) x concurrency (2).
        ready_count=1,
        bulk_method=".delay() loop",
        worker_argv=celery_argv,
        worker_env=lambda url: {"BENCH_BROKER_URL": url},
        client=CeleryClient,
    ),
]


def make_systems(huey_poll: float = HUEY_POLL) -> dict[str, System]:
    """Every system, in the order the rounds alternate them."""
    systems = [
        taskq_embedded("taskq-embedded", "normal"),
        taskq_embedded("taskq-embedded-full", "full"),
        taskq_embedded("taskq-embedded-events", "normal", events=True),
        huey_system(huey_poll),
        *RABBITMQ_SYSTEMS,
    ]
    return {system.name: system for system in systems}


SYSTEMS = make_systems()
