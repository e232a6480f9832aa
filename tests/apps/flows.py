"""Workflow tasks (``-A tests.apps.flows:app``): chain steps and chord parts that note each
run in a file, so tests count executions per step."""

from __future__ import annotations

import json
import os
import signal
import time
from types import SimpleNamespace
from typing import Any

from taskq import App

from . import basic


def _note(path: str, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")


def step(value: int, path: str, token: str, pause: float = 0.0, hold: str = "") -> int:
    """A chain step: note ``token`` (and our pid), wait ``pause`` s (and until the file
    ``hold`` exists, if named), return value + 1."""
    _note(path, f"{token} {os.getpid()}")
    if pause:
        time.sleep(pause)
    if hold:
        basic.wait_for_file(hold)
    return value + 1


def part(index: int, path: str, pause: float = 0.0) -> int:
    """A chord header task: note our index, wait ``pause`` s, return index * 10."""
    _note(path, f"part {index} {os.getpid()}")
    if pause:
        time.sleep(pause)
    return index * 10


def join(values: list[int], path: str) -> list[int]:
    """A chord callback: note the values it got (once per run, at its end), and which
    process ran it (in ``path``.pids: a kill -9 right after the note explains a second run)."""
    _note(path + ".pids", str(os.getpid()))
    _note(path, "callback " + json.dumps(values))
    return values


def errback(task_id: str, path: str) -> None:
    """An errback (Celery's link_error): gets the failed task's id first."""
    _note(path, f"errback-for-{task_id} {os.getpid()}")


def boom(value: Any, message: str) -> None:
    raise ValueError(message)


def resend(value: Any, sig: dict[str, Any]) -> str:
    """Send the signature we got as an argument (a signature is JSON): its task id."""
    from taskq import signature

    result = signature(sig, app=app).apply_async(ignore_result=True)
    return str(result.id)


def build(app: App) -> SimpleNamespace:
    tasks = basic.build(app)
    for fn in (step, part, join, errback, boom, resend):
        setattr(tasks, fn.__name__, app.task(fn))
    tasks.tsum = app.task(name="tests.apps.flows.tsum")(sum)
    return tasks


app = App()
tasks = build(app)


@app.after_task
def _die_after(run: Any) -> None:
    """kill -9 this slot process when a task has run but before its message is settled,
    once per file ``<TASKQ_TEST_DIE_DIR>/<task id>`` a test created (it is removed first)."""
    directory = os.environ.get("TASKQ_TEST_DIE_DIR")
    if not directory:
        return
    marker = os.path.join(directory, run.request.id)
    try:
        os.unlink(marker)
    except FileNotFoundError:
        return
    os.kill(os.getpid(), signal.SIGKILL)
