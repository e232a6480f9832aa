"""An app with every hook and a task class with handlers; each appends a line to the file
named by $HOOK_LOG (``-A tests.apps.hooked:app``). One before_task hook always raises: the
tests prove that a failing hook changes nothing."""

from __future__ import annotations

import os
from typing import Any

from taskq import App, Task, TaskRun


def note(*words: object) -> None:
    with open(os.environ["HOOK_LOG"], "a") as f:
        f.write(" ".join(str(w) for w in words) + "\n")


def worker_started() -> None:
    note("worker-start", os.getpid())


def slot_started() -> None:
    note("slot-start", os.getpid())


def add_tenant(headers: dict[str, Any]) -> None:
    headers["tenant"] = "acme"


def broken(run: TaskRun) -> None:
    raise RuntimeError("a hook that always fails")


def before(run: TaskRun) -> None:
    note("before", run.task.name.rsplit(".", 1)[-1], run.request.id, os.getpid())


def after(run: TaskRun) -> None:
    note("after", run.task.name.rsplit(".", 1)[-1], run.request.id, run.outcome,
         f"{run.runtime:.6f}", type(run.exception).__name__ if run.exception else "-")


def failed(run: TaskRun) -> None:
    note("failure", run.request.id, type(run.exception).__name__,
         "Traceback" in (run.traceback or ""))


class Audited(Task[Any, Any]):
    def on_success(self, retval: Any, task_id: str, args: list[Any],
                   kwargs: dict[str, Any]) -> None:
        note("on_success", task_id, retval)

    def on_failure(self, exc: BaseException, task_id: str, args: list[Any],
                   kwargs: dict[str, Any], traceback: str) -> None:
        note("on_failure", task_id, type(exc).__name__)

    def on_retry(self, exc: BaseException, task_id: str, args: list[Any],
                 kwargs: dict[str, Any], traceback: str) -> None:
        note("on_retry", task_id, type(exc).__name__)


def tenant(self: Any) -> Any:
    return self.request.headers.get("tenant")


def audited(self: Any, mode: str) -> str:
    if mode == "fail":
        raise KeyError("failed on purpose")
    if mode == "retry" and self.request.retries == 0:
        raise self.retry(exc=ValueError("again"), countdown=0)
    return mode


def build(app: App) -> dict[str, Any]:
    app.on_worker_start(worker_started)
    app.on_slot_start(slot_started)
    app.on_send(add_tenant)
    app.before_task(broken)
    app.before_task(before)
    app.after_task(after)
    app.on_failure(failed)
    return {
        "tenant": app.task(bind=True)(tenant),
        "audited": app.task(base=Audited, bind=True, max_retries=1)(audited),
    }


app = App()
tasks = build(app)
