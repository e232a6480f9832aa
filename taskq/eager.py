"""Running a task in the calling process: ``App(eager=True)`` and ``task.apply()``, for tests.

The call goes through what a worker does with a message, minus the broker: the arguments are
encoded into the same message (so a test meets the ``EncodeError`` or ``MessageTooLarge``
that ``.delay()`` would raise), the worker's own code decodes, checks and runs it, and the
result comes back through the same encoding (a tuple becomes a list; an exception type that
is not registered with the app arrives as :class:`taskq.RemoteError`).

What differs from a worker, on purpose: ``countdown``, ``eta`` and ``expires`` are ignored
(the task runs now); a retry runs again at once, without its countdown, until it succeeds or
``max_retries`` says stop; a hard ``time_limit`` is not enforced (a soft one is, in the main
thread). Nothing touches a broker, so no file is created and no server is needed.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import serialization
from .message import task_envelope
from .producer import check_size
from .result import EagerResult
from .worker.execute import Job, execute

if TYPE_CHECKING:
    from .app import App

#: What stands in for a reply queue: the worker's code sends a result only to someone.
_CALLER = "eager"


def run_eagerly(
    app: App,
    name: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    queue: str,
    task_id: str,
    ignore_result: bool = False,
    *,
    time_limit: float | None = None,
    soft_time_limit: float | None = None,
) -> EagerResult[Any]:
    """Run task ``name`` here, now; its outcome as a result handle."""
    config = app.config
    extra_headers = app.hooks.send_headers()
    retries = 0
    while True:
        envelope = task_envelope(
            task_id=task_id,
            name=name,
            args=tuple(args),
            kwargs=kwargs,
            queue=queue,
            serializer=config.serializer,
            reply_to=_CALLER,
            retries=retries,
            time_limit=time_limit,
            soft_time_limit=soft_time_limit,
            extra_headers=extra_headers,
        )
        check_size(envelope, config.max_message_size)
        job = Job(
            task=name,
            task_id=task_id,
            body=envelope.body,
            content_type=envelope.content_type,
            headers=envelope.headers,
            reply_to=_CALLER,
            correlation_id=task_id,
            delivery_info={"exchange": "", "routing_key": queue, "queue": queue,
                           "redelivered": False, "slot": "eager"},
            time_limit=time_limit,
            soft_time_limit=soft_time_limit,
            accept=config.accept,
        )
        main = threading.current_thread() is threading.main_thread()
        outcome = execute(app, job, use_signals=main)
        if outcome.kind != "retry":
            break
        retries += 1
    meta = None
    if outcome.body is not None and not ignore_result:
        meta = serialization.decode(outcome.content_type, outcome.body, ("json", *config.accept))
    return EagerResult(task_id, name, meta, app.exceptions)
