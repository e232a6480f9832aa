"""A real Celery app that serves taskq's test task names (``celery -A tests.apps.celery_peer``).

It never imports taskq: it is the protocol partner nobody here wrote.  Its tasks carry the same
names as :mod:`tests.apps.basic` so that a taskq client's ``tasks.add.delay(2, 3)`` is served by
a Celery worker.  The broker URL comes from ``CELERY_BROKER_URL``; results go back the way
Celery's ``rpc://`` backend sends them, to the caller's ``reply_to``.
"""

from __future__ import annotations

import os

from celery import Celery

app = Celery("celery_peer", broker=os.environ.get("CELERY_BROKER_URL"), backend="rpc://")
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    # Remote control stays on: the tests add and cancel one queue per test with add_consumer.
    worker_enable_remote_control=True,
)


class PeerError(Exception):
    """An exception type only the Celery worker knows: a taskq caller gets RemoteError."""


@app.task(name="tests.apps.basic.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="tests.apps.basic.fail")
def fail(kind: str, message: str) -> None:
    if kind == "ValueError":
        raise ValueError(message)
    if kind == "KeyError":
        raise KeyError(message)
    raise PeerError(message)


# -- chain steps, with the names of tests.apps.flows / tests.apps.interop ------------------------


@app.task(name="tests.apps.interop.mul")
def mul(x: int, y: int) -> int:
    return x * y


@app.task(name="tests.apps.flows.boom")
def boom(value: object, message: str) -> None:
    raise ValueError(message)


@app.task(name="tests.apps.flows.step")
def step(value: int, path: str, token: str) -> int:
    """A chain step that notes ``token`` in ``path`` (so a test sees which steps ran)."""
    with open(path, "a") as f:
        f.write(f"{token} {os.getpid()}\n")
    return value + 1
