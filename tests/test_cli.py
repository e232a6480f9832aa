"""The ``taskq`` command: help that reads well, one-line errors for a wrong -A."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from .support import ROOT, Broker, WorkerProcess, run_taskq, wait_for


def test_help_lists_commands_and_version() -> None:
    top = run_taskq("--help")
    assert top.returncode == 0 and "worker" in top.stdout and "taskq worker -A" in top.stdout
    worker = run_taskq("worker", "--help")
    assert worker.returncode == 0
    for flag in ("-A, --app", "-Q, --queues", "-c, --concurrency", "-l, --loglevel", "TASKQ_APP"):
        assert flag in worker.stdout
    assert run_taskq("-V").stdout.startswith("taskq, version ")


@pytest.mark.parametrize(("spec", "message"), [
    ("no_such_module:app", "cannot import module 'no_such_module'"),
    ("tests.apps.basic:nope", "module 'tests.apps.basic' has no attribute 'nope'"),
    ("tests.apps.basic:build", "tests.apps.basic:build is a function, not a taskq.App"),
    ("tests.apps.broken:app", "importing 'tests.apps.broken' raised ZeroDivisionError"),
    ("tests.apps.needs_dependency:app", "a dependency of your module is missing"),
])
def test_a_wrong_app_is_a_one_line_error(spec: str, message: str) -> None:
    result = run_taskq("worker", "-A", spec)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr


def test_missing_app_names_the_option() -> None:
    result = run_taskq("worker", env={"TASKQ_APP": ""})
    assert result.returncode == 2 and "Missing option '-A' / '--app'" in result.stderr


def test_the_app_can_come_from_the_environment(
        tasks: SimpleNamespace, broker: Broker, queue: str, tmp_path: Path) -> None:
    log = (tmp_path / "worker.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "taskq", "worker", "-Q", queue, "-c", "1"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={"TASKQ_APP": "tests.apps.basic:app", "PATH": "/usr/bin",
                                 "TASKQ_BROKER_URL": broker.url})
    try:
        wait_for(lambda: broker.exists(queue) and broker.counts(queue)[1] == 1, 30,
                 "the worker to consume")
        assert tasks.add.delay(1, 2).get(timeout=10) == 3
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
        log.close()


def test_an_unreachable_broker_at_start_is_waited_for_and_logged_once(
        tmp_path: Path, start_worker: Callable[..., WorkerProcess]) -> None:
    worker = start_worker(env={"TASKQ_BROKER_URL": "amqp://guest:secret@127.0.0.1:1//"},
                          ready=False)
    wait_for(lambda: "waiting for the broker" in worker.log(), 20, "the worker to say it waits")
    log = worker.log()
    assert "amqp://guest:****@127.0.0.1:1//" in log and "secret" not in log
    assert log.count("waiting for the broker") == 1
