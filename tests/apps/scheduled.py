"""A schedule for the beat tests (``-A tests.apps.scheduled:app``).

Three entries every ``$TASKQ_TEST_BEAT_EVERY`` seconds (default 0.5): one per missed policy,
``late`` and ``skip``, and ``delayed``, sent with a countdown (on RabbitMQ such a message is
stored and recorded in two steps, see taskq.broker.amqp.beat). Their task notes each run in
the file ``$TASKQ_TEST_BEAT_FILE``, one line: the entry, the due time the beat fired it for,
its task id and when it ran; so a test counts runs per due time. And a cron entry,
``morning``, that no test waits for (it shows in ``taskq beat --list``).

Each test gives its beats a schedule of its own (``$TASKQ_TEST_BEAT_NAME``, the app's
``beat_name``) and its queue (``$TASKQ_TEST_QUEUE``).
"""

from __future__ import annotations

import os
import time

from taskq import App, Task

from . import basic

EVERY = float(os.environ.get("TASKQ_TEST_BEAT_EVERY", "0.5"))
#: The countdown of entry ``delayed`` (seconds).
DELAY = 0.1


def note(self: Task[..., None], path: str) -> None:
    """Append ``entry due task_id ran_at`` to ``path``: one line per run."""
    headers = self.request.headers
    with open(path, "a") as f:
        f.write(f"{headers.get('beat_entry')} {headers.get('beat_due')} {self.request.id} "
                f"{time.time():.3f}\n")


app = App(default_queue=os.environ.get("TASKQ_TEST_QUEUE", "taskq"),
          beat_name=os.environ.get("TASKQ_TEST_BEAT_NAME", "tests"))
noted = app.task(bind=True, name="tests.apps.scheduled.note")(note)
add = app.task(name="tests.apps.basic.add")(basic.add)
runs = os.environ.get("TASKQ_TEST_BEAT_FILE", os.devnull)
app.schedule(noted.s(runs), every=EVERY, name="late")
app.schedule(noted.s(runs), every=EVERY, name="skip", missed="skip")
app.schedule(noted.s(runs).set(countdown=DELAY), every=EVERY, name="delayed")
app.schedule(add.s(1, 2), cron="0 7 * * mon-fri", tz="Europe/Berlin", name="morning")
