"""Tasks the tests send to real workers (``-A tests.apps.basic:app``).

The functions live at module level so their task names (``tests.apps.basic.add``, ...) are the
same in the test process, which registers them on its own App per test, and in the worker.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from taskq import App


class CustomError(Exception):
    """An exception type a caller must not import: it arrives as taskq.RemoteError."""


def add(x: int, y: int) -> int:
    return x + y


def echo(value: Any) -> Any:
    return value


def fail(kind: str, message: str) -> None:
    if kind == "ValueError":
        raise ValueError(message)
    if kind == "KeyError":
        raise KeyError(message)
    raise CustomError(message)


def record(path: str, token: str) -> str:
    """Append a line to ``path``: the side effect fault tests count."""
    with open(path, "a") as f:
        f.write(token + "\n")
    return token


def whoami() -> int:
    return os.getpid()


def wait_for_file(path: str, timeout: float = 60.0) -> int:
    """Hold the slot until ``path`` exists (the test decides when), then return our pid."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)
    return os.getpid()


def rendezvous(directory: str, me: str, others: list[str], timeout: float = 30.0) -> int:
    """Announce ``me`` and wait until all ``others`` announced: proves they ran at once."""
    Path(directory, me).touch()
    deadline = time.monotonic() + timeout
    while not all(Path(directory, name).exists() for name in others):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{me} waited alone: tasks did not run concurrently")
        time.sleep(0.01)
    return os.getpid()


def sleep_for(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def unserializable() -> object:
    return object()


def pid_then_block(pid_file: str, release_file: str) -> str:
    """Write our pid, then hold the slot until released: for killing a task mid-run."""
    Path(pid_file).write_text(str(os.getpid()))
    wait_for_file(release_file)
    return "released"


def die(marker: str) -> None:
    """Kill our own process, every time: a poison message."""
    with open(marker, "a") as f:
        f.write("attempt\n")
    os._exit(13)


def stamp(path: str, token: str) -> float:
    """Record when we ran (wall clock, shared by test and worker on one machine)."""
    now = time.time()
    with open(path, "a") as f:
        f.write(f"{token} {now}\n")
    return now


def flaky(self: Any, log: str, failures: int) -> list[int]:
    """Fail ``failures`` times (retrying each time), then succeed; log self.request each run."""
    request = self.request
    with open(log, "a") as f:
        f.write(f"{request.id} {request.retries} {request.delivery_info['redelivered']}\n")
    if request.retries < failures:
        raise self.retry(exc=ValueError(f"attempt {request.retries} failed"), countdown=0.2)
    return [request.retries]


def note_then_block(self: Any, log: str, token: str, release: str) -> str:
    """Note our run (token, redelivered flag, pid), then hold the slot until released."""
    with open(log, "a") as f:
        f.write(f"{token} {self.request.delivery_info['redelivered']} {os.getpid()}\n")
    wait_for_file(release)
    return token


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def note_overlap_then_block(log: str, token: str, release: str) -> str:
    """Note our run (token, whether an earlier run of the same token still runs, pid), then
    hold the slot until released."""
    earlier = []
    if os.path.exists(log):
        with open(log) as f:
            earlier = [int(line.split()[2]) for line in f if line.split()[0] == token]
    overlapping = any(_running(pid) for pid in earlier)
    with open(log, "a") as f:
        f.write(f"{token} {overlapping} {os.getpid()}\n")
    wait_for_file(release)
    return token


def unreliable(self: Any, log: str) -> None:
    """Raise ConnectionError every time: autoretry_for with exponential backoff."""
    with open(log, "a") as f:
        f.write(f"{self.request.retries} {time.time()}\n")
    raise ConnectionError("service unavailable")


TASKS = (add, echo, fail, record, whoami, wait_for_file, rendezvous, sleep_for, unserializable,
         pid_then_block, die, stamp)


def build(app: App) -> SimpleNamespace:
    """Register the tasks on ``app``; return them by name (``tasks.add.delay(...)``)."""
    registered = {fn.__name__: app.task(fn) for fn in TASKS}
    registered["flaky"] = app.task(bind=True, max_retries=5)(flaky)
    registered["note_then_block"] = app.task(bind=True)(note_then_block)
    registered["note_overlap_then_block"] = app.task(note_overlap_then_block)
    registered["unreliable"] = app.task(
        bind=True, autoretry_for=(ConnectionError,), retry_backoff=0.2, retry_backoff_max=0.5,
        retry_jitter=False, max_retries=3,
    )(unreliable)
    return SimpleNamespace(app=app, **registered)


app = App()
tasks = build(app)
