"""Workflow tasks for Celery interop (``-A tests.apps.interop:app``): tests.apps.flows plus
``mul``, on an App whose default queue is ``$TASKQ_TEST_DEFAULT_QUEUE``.

A chain's later steps go where the worker that sends them routes them: a Celery client's
steps name no queue (Celery's worker sends them to its own ``task_default_queue``), so a
taskq worker serving them needs the same default queue as the Celery client, as two Celery
apps sharing a queue would. tests/apps/celery_peer.py has the same task names.
"""

from __future__ import annotations

import os

from taskq import App

from . import flows


def mul(x: int, y: int) -> int:
    return x * y


app = App(default_queue=os.environ.get("TASKQ_TEST_DEFAULT_QUEUE") or "taskq")
tasks = flows.build(app)
tasks.mul = app.task(mul)
