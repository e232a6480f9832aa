"""The taskq side: ``python -m taskq worker -A benchmarks.taskq_tasks:app -Q <queue> -c 2``.

The worker builds ``app`` from ``$TASKQ_BROKER_URL``; the benchmark client calls
:func:`make_app` with its own vhost URL and queue. Both register ``add`` under one name.
"""

from __future__ import annotations

from typing import Any

from taskq import App

TASK_NAME = "benchmarks.add"


def add(x: int, y: int) -> int:
    return x + y


def make_app(broker_url: str | None = None, queue: str = "bench") -> tuple[App, Any]:
    app = App(broker_url, default_queue=queue)
    return app, app.task(name=TASK_NAME)(add)


app, _ = make_app()
