"""Rate-limited tasks (``-A tests.apps.rated:app``): five a second, per worker and for
all workers; each notes when it started."""

from __future__ import annotations

from types import SimpleNamespace

from taskq import App

from . import basic

#: One start per this many seconds.
INTERVAL = 0.2


def build(app: App) -> SimpleNamespace:
    tasks = basic.build(app)
    tasks.paced = app.task(name="tests.apps.rated.paced", rate_limit="5/s")(basic.stamp)
    tasks.paced_globally = app.task(name="tests.apps.rated.paced_globally",
                                    rate_limit="5/s", rate_limit_scope="global")(basic.stamp)
    return tasks


app = App()
tasks = build(app)
