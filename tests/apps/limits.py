"""Tasks with time limits (``-A tests.apps.limits:app``)."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

from taskq import App, SoftTimeLimitExceeded, Task


def overrun(seconds: float) -> str:
    """Sleep past the hard limit: the worker must stop us."""
    time.sleep(seconds)
    return "finished"


def tidy(marker: str, seconds: float) -> str:
    """Catch the soft limit, clean up, and return normally."""
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        with open(marker, "w") as f:
            f.write("cleaned up")
        return "stopped early, cleaned up"
    return "finished"


def whoami() -> int:
    return os.getpid()


def my_limits(self: Task[..., list[float | None]]) -> list[float | None]:
    """What the running task sees of its own limits."""
    return [self.request.time_limit, self.request.soft_time_limit]


def build(app: App) -> SimpleNamespace:
    return SimpleNamespace(
        app=app,
        overrun=app.task(time_limit=1.0)(overrun),
        tidy=app.task(soft_time_limit=0.5)(tidy),
        whoami=app.task(whoami),
        my_limits=app.task(bind=True, time_limit=20.0, soft_time_limit=10.0)(my_limits),
    )


app = App()
tasks = build(app)
