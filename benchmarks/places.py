"""Where a system's messages live for one run: a RabbitMQ vhost, or an embedded system's file.

The suite treats every place alike (create it, purge a queue, wait for a worker, delete it),
so a run that selects only embedded systems never touches RabbitMQ: no ``rabbitmqctl``, no
connection, no broker CPU meter.
"""

from __future__ import annotations

from typing import Protocol


class Worker(Protocol):
    """What a place needs to know of a worker it waits for (a procs.WorkerProcess)."""

    @property
    def pid(self) -> int: ...

    def check_alive(self) -> None: ...


class Place(Protocol):
    name: str
    #: Whether the place is on the shared RabbitMQ: then ``rabbitmqctl`` must work, and the
    #: broker node's CPU is counted per task. An embedded system has no broker process.
    needs_rabbitmq: bool

    @property
    def url(self) -> str:
        """What the system's client and worker are given to find the place."""

    def create(self) -> object: ...

    def delete(self) -> None:
        """Remove everything the run made there (also after errors)."""

    def purge(self, queue: str) -> None:
        """Drop every task waiting in ``queue`` (no worker of this place is running)."""

    def wait_ready(self, queue: str, slots: int, worker: Worker, timeout: float) -> None:
        """Return once the worker has ``slots`` slots taking tasks; raise if it died."""

    def wait_stopped(self, queue: str) -> None:
        """After the worker process tree is gone: until the place shows no trace of it."""

    def connection_lost(self) -> bool:
        """True if the place went away under a phase (RabbitMQ restarted): figures void."""

    def wait_reachable(self) -> None: ...

    def describe(self) -> str: ...
