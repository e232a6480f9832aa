"""The basic tasks on an App that trusts the test CA (``-A tests.apps.tls:app``)."""

from __future__ import annotations

import os

from taskq import App

from .basic import build

app = App(ssl_ca_file=os.environ.get("TASKQ_TEST_TLS_CA"))
tasks = build(app)
