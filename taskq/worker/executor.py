"""A child process for tasks with a hard time limit: the one thing a slot can't run itself.

A slot runs tasks in its own thread, next to its connection, which is what makes a task's
round trip cheap.  A task with a hard ``time_limit`` must be stoppable without losing the
message or the connection, so the slot hands it to this child (started on first need) and
kills and replaces the child if the limit passes.  The slot waits on :meth:`fileno` together
with its broker socket, so heartbeats and acks keep flowing meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
from multiprocessing.connection import Connection
from typing import Any

from .execute import Job, Outcome, execute, install_soft_limit_handler

log = logging.getLogger("taskq.worker")


def forkserver_context(app_spec: str) -> Any:
    """multiprocessing's fork server, preloading the app's module (a slot or an executor
    forks from it ready to run) and :mod:`.forkserver_init` (it then ignores SIGTERM)."""
    context = multiprocessing.get_context("forkserver")
    with contextlib.suppress(ValueError):
        context.set_forkserver_preload(
            ["taskq.worker.forkserver_init", app_spec.partition(":")[0]])
    return context


def child_main(app_spec: str, jobs: Connection, lifeline: Connection, loglevel: int) -> None:
    """Entry point of the executor process."""
    # Shutdown is the supervisor's call: a Ctrl-C sent to the whole process group, or a
    # SIGTERM from a service manager, must not cut a running task short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from ..loading import load_app
    from ..logs import setup_logging

    setup_logging(loglevel)
    threading.Thread(target=_exit_with_parent, args=(lifeline,), daemon=True).start()
    app = load_app(app_spec)
    install_soft_limit_handler()
    app.hooks.call("on_slot_start", app.hooks.slot_start)  # tasks run here: pools open here
    jobs.send(("ready", os.getpid()))
    while True:
        try:
            job = jobs.recv()
        except (EOFError, OSError):
            return
        jobs.send(execute(app, job))


def _exit_with_parent(lifeline: Connection) -> None:
    """If the slot dies (even by kill -9), don't leave a task running as an orphan."""
    with contextlib.suppress(EOFError, OSError):
        lifeline.recv()
    os._exit(70)


class ProcessExecutor:
    def __init__(self, ctx: Any, app_spec: str, loglevel: int, name: str) -> None:
        self.name = name
        self._jobs, child_jobs = ctx.Pipe()
        child_life, self._lifeline = ctx.Pipe(duplex=False)
        self.process: multiprocessing.process.BaseProcess = ctx.Process(
            target=child_main, args=(app_spec, child_jobs, child_life, loglevel), name=name
        )
        self.process.start()
        child_jobs.close()
        child_life.close()

    def wait_ready(self, timeout: float) -> None:
        if not self._jobs.poll(timeout):
            self.kill()
            raise RuntimeError(f"{self.name}: child process did not start within {timeout:g}s")
        try:
            self._jobs.recv()
        except (EOFError, OSError):
            self.kill()
            raise RuntimeError(
                f"{self.name}: child process exited while starting ({self.describe_death()})"
            ) from None

    def fileno(self) -> int:
        fd: int = self._jobs.fileno()
        return fd

    def submit(self, job: Job) -> None:
        self._jobs.send(job)

    def collect(self) -> Outcome | None:
        try:
            outcome: Outcome = self._jobs.recv()
        except (EOFError, OSError):
            self.process.join(timeout=5)
            return None
        return outcome

    def describe_death(self) -> str:
        code = self.process.exitcode
        if code is None:
            return "still running"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)

    def close(self) -> None:
        self.kill()
        self._jobs.close()
        self._lifeline.close()
        self.process.close()
