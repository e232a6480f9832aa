"""The basic tasks on an App with a 1-second heartbeat (``-A tests.apps.heartbeat:app``)."""

from __future__ import annotations

from taskq import App

from .basic import build

app = App(heartbeat=1.0)
tasks = build(app)
