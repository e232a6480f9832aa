"""The basic tasks on an app whose queues are priority queues (``max_priority=10``): what the
priority tests' workers serve (``-A tests.apps.priorities:app``)."""

from __future__ import annotations

from taskq import App

from . import basic

MAX_PRIORITY = 10

app = App(max_priority=MAX_PRIORITY)
tasks = basic.build(app)
