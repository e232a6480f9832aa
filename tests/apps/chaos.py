"""Tasks of the chaos tests (``-A tests.apps.chaos:app``): every run leaves lines behind.

``record`` appends ``start <token> <pid>`` to a shared file when a run begins and
``end <token> <pid>`` when it is about to return, each as one ``write()`` on an ``O_APPEND``
descriptor (so lines from concurrent slots never interleave, and a run killed mid-task leaves
a ``start`` without an ``end``).  Counting the lines per token tells how often each logical task
ran, whatever copies of its message the broker or taskq made.
"""

from __future__ import annotations

import os
import random
import time
from types import SimpleNamespace

from taskq import App


def expected(token: str) -> str:
    """What ``record(path, token)`` returns: a caller holding anything else was misled."""
    return token.upper()


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def record(path: str, token: str, max_ms: float = 20.0) -> str:
    """Log the run's start, work 0..``max_ms`` ms, log its end; return ``expected(token)``."""
    pid = os.getpid()
    _append(path, f"start {token} {pid}\n")
    time.sleep(random.uniform(0.0, max_ms) / 1000.0)
    _append(path, f"end {token} {pid}\n")
    return expected(token)


def build(app: App) -> SimpleNamespace:
    """Register the tasks on ``app`` (a client's), same names as the worker's."""
    return SimpleNamespace(app=app, record=app.task(record))


app = App()  # the broker from $TASKQ_BROKER_URL
tasks = build(app)
