"""The taskq side of the canvas benchmark (``benchmarks/canvas.py``).

Worker: ``python -m taskq worker -A benchmarks.canvas_taskq:app -Q bench -c 2`` with
``$TASKQ_BROKER_URL`` set; the benchmark's client calls :func:`make_app` with the same URL.
"""

from __future__ import annotations

from typing import Any

from taskq import App

ADD, TSUM = "benchmarks.add", "benchmarks.tsum"


def add(x: int, y: int) -> int:
    return x + y


def tsum(values: list[int]) -> int:
    return sum(values)


def make_app(broker_url: str | None = None, queue: str = "bench") -> tuple[App, Any, Any]:
    app = App(broker_url, default_queue=queue)
    return app, app.task(name=ADD)(add), app.task(name=TSUM)(tsum)


app, _, _ = make_app()
