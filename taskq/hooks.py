"""Hooks: the app's functions called at points of a worker's and a task's life.

Registered with decorators on the app (``@app.before_task`` ...); each point may have any
number, called in the order registered, in the process where that point happens:

* ``on_worker_start()``: once, in the worker's main process, before its slots start;
* ``on_slot_start()``: in each process (or thread, with ``--pool threads``) that runs tasks,
  before its first task: open connection pools here, not at import time (a pool opened
  before a fork is shared by processes that must not share it);
* ``on_send(headers)``: in the sending process, for each task message, with its headers (a
  dict to add to: a ``traceparent`` for tracing, a tenant id); they reach the task as
  ``self.request.headers`` and survive retries;
* ``before_task(run)``, ``after_task(run)``, ``on_failure(run)``: around each run of a task,
  where it runs, with a :class:`TaskRun` (after_task: every outcome; on_failure: only when
  the task raised and will not be retried).

A hook that raises is logged with its traceback and never changes what happens to the task:
it still runs, its result is still sent, its message is still acked.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .task import Request, Task

log = logging.getLogger("taskq.hooks")

#: What a task run came to, as ``TaskRun.outcome`` says it.
SUCCEEDED, FAILED, RETRIED = "succeeded", "failed", "retried"


@dataclass
class TaskRun:
    """One run of a task, as the task hooks see it."""

    task: Task[Any, Any]
    request: Request
    #: None before the run; then "succeeded", "failed" or "retried".
    outcome: str | None = None
    #: Seconds the function ran (0.0 before the run).
    runtime: float = 0.0
    #: The return value (succeeded).
    result: Any = None
    #: What it raised (failed, retried).
    exception: BaseException | None = None
    #: The worker's formatted traceback (failed, retried).
    traceback: str | None = None
    started: float = field(default_factory=time.perf_counter, repr=False)


Hook = Callable[..., Any]


class Hooks:
    def __init__(self) -> None:
        self.worker_start: list[Hook] = []
        self.slot_start: list[Hook] = []
        self.send: list[Hook] = []
        self.before_task: list[Hook] = []
        self.after_task: list[Hook] = []
        self.failure: list[Hook] = []

    def send_headers(self) -> dict[str, Any] | None:
        """The headers the on_send hooks add to a message (None: no such hook)."""
        if not self.send:
            return None
        headers: dict[str, Any] = {}
        self.call("on_send", self.send, headers)
        return headers

    def call(self, point: str, hooks: list[Hook], *args: Any) -> None:
        """Call each hook of ``point``; log (never raise) what one raises."""
        for hook in hooks:
            try:
                hook(*args)
            except Exception:
                log.exception("%s hook %s raised (ignored: the task goes on as it would)",
                              point, getattr(hook, "__qualname__", hook))
