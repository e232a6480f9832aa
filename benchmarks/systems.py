"""The three systems under test, behind one small surface: a worker command and a client."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

SLOTS = 2


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
    #: Consumers the broker shows on the queue once the worker is fully up.
    consumers_when_ready: int
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


SYSTEMS = {
    "taskq": System(
        name="taskq",
        consumers_when_ready=SLOTS,
        bulk_method="delay_many (pipelined confirms)",
        worker_argv=taskq_argv,
        worker_env=lambda url: {"TASKQ_BROKER_URL": url},
        client=TaskqClient,
    ),
    "floor": System(
        name="floor",
        consumers_when_ready=SLOTS,
        bulk_method="pipelined confirms",
        worker_argv=floor_argv,
        worker_env=lambda url: {},
        client=FloorClientAdapter,
    ),
    "celery": System(
        name="celery",
        # One consumer per worker: prefetch = multiplier (1) x concurrency (2).
        consumers_when_ready=1,
        bulk_method=".delay() loop",
        worker_argv=celery_argv,
        worker_env=lambda url: {"BENCH_BROKER_URL": url},
        client=CeleryClient,
    ),
}
