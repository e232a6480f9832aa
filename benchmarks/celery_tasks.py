"""The Celery side, configured to taskq's contract.

Worker: ``celery -A benchmarks.celery_tasks:app worker -P prefork -c 2 -Q <queue>
--without-gossip --without-mingle --without-heartbeat`` with ``$BENCH_BROKER_URL`` set.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

TASK_NAME = "benchmarks.add"


def add(x: int, y: int) -> int:
    return x + y


#: Celery configured to taskq's contract (acks after the task, prefetch 1, confirmed
#: persistent publishes, JSON only): every Celery figure of the benchmarks uses it.
CONTRACT = {
    "task_acks_late": True,
    "worker_prefetch_multiplier": 1,
    "broker_transport_options": {"confirm_publish": True},
    "task_default_delivery_mode": "persistent",
    "task_serializer": "json",
    "result_serializer": "json",
    "accept_content": ["json"],
    "broker_connection_retry_on_startup": True,
    "worker_hijack_root_logger": False,
}


def make_app(broker_url: str, queue: str = "bench") -> tuple[Celery, Any]:
    app = Celery("benchmarks", broker=broker_url, backend="rpc://")
    app.conf.update(CONTRACT, task_default_queue=queue)
    return app, app.task(name=TASK_NAME)(add)


app, _ = make_app(os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"))
