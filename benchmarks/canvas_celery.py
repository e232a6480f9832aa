"""The Celery side of the canvas benchmark (``benchmarks/canvas.py``): taskq's contract
(as in celery_tasks.py), but results in Redis, since Celery's ``rpc://`` backend has no chords.

Worker: ``celery -A benchmarks.canvas_celery:app worker -P prefork -c 2 -Q bench
--without-gossip --without-mingle --without-heartbeat`` with ``$BENCH_BROKER_URL``,
``$BENCH_RESULT_BACKEND`` (``redis://localhost:6379/<db>``) and ``$BENCH_REDIS_PREFIX`` (every
key the run makes starts with it, so the run deletes exactly its own keys).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from benchmarks.celery_tasks import CONTRACT

ADD, TSUM = "benchmarks.add", "benchmarks.tsum"


def add(x: int, y: int) -> int:
    return x + y


def tsum(values: list[int]) -> int:
    return sum(values)


def make_app(broker_url: str, backend_url: str, prefix: str,
             queue: str = "bench") -> tuple[Celery, Any, Any]:
    app = Celery("benchmarks-canvas", broker=broker_url, backend=backend_url,
                 set_as_current=False)
    app.conf.update(
        CONTRACT,
        # The chain's later steps are sent by the worker to its own default queue.
        task_default_queue=queue,
        result_backend_transport_options={"global_keyprefix": prefix},
        result_expires=3600,  # keys left behind by a killed run go away by themselves
    )
    return app, app.task(name=ADD)(add), app.task(name=TSUM)(tsum)


app, _, _ = make_app(
    os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    os.environ.get("BENCH_RESULT_BACKEND", "redis://localhost:6379/11"),
    os.environ.get("BENCH_REDIS_PREFIX", "bench-canvas-"),
)
