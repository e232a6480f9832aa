"""Hooks: the app's functions at each point of a worker's and a task's life, in the process
where it happens; a failing hook is logged and changes nothing (real workers, both brokers)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import taskq
from taskq import App

from .apps import hooked
from .support import WorkerProcess, wait_for


def _lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def hook_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "hooks"
    monkeypatch.setenv("HOOK_LOG", str(path))
    return path


def test_every_hook_runs_where_its_point_happens(
        make_app: Callable[..., App], hook_log: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given a worker of an app with every hook (-c 2), when a task succeeds, one fails and
    one retries once, then: on_worker_start ran once in the worker's main process,
    on_slot_start once in each slot process, before/after_task around each run in the
    slot that ran it, on_failure and the task class's handlers once each where they apply;
    the before_task hook that raises was logged and every task still ran and answered."""
    tasks = hooked.build(make_app())
    worker = start_worker(app="tests.apps.hooked:app", env={"HOOK_LOG": str(hook_log)})
    ok = tasks["audited"].delay("ok")
    failing = tasks["audited"].delay("fail")
    retried = tasks["audited"].delay("retry")
    assert ok.get(timeout=15) == "ok" and retried.get(timeout=15) == "retry"
    with pytest.raises(KeyError):
        failing.get(timeout=15)
    wait_for(lambda: sum(w[0] == "after" for w in _lines(hook_log)) == 4, 10,
             "after_task of the 4 runs (logged after each result went out)")
    seen = _lines(hook_log)
    assert [w[1] for w in seen if w[0] == "worker-start"] == [str(worker.pid)]
    slot_pids = [w[1] for w in seen if w[0] == "slot-start"]
    assert len(slot_pids) == 2 and str(worker.pid) not in slot_pids
    befores = [w for w in seen if w[0] == "before"]
    assert sorted(w[2] for w in befores) == sorted([ok.id, failing.id, retried.id, retried.id])
    assert all(w[3] in slot_pids for w in befores)
    outcomes = sorted((w[2], w[3], w[5]) for w in seen if w[0] == "after")
    assert outcomes == sorted([(ok.id, "succeeded", "-"), (failing.id, "failed", "KeyError"),
                               (retried.id, "retried", "ValueError"),
                               (retried.id, "succeeded", "-")])
    assert all(float(w[4]) >= 0 for w in seen if w[0] == "after")
    assert [w[1:] for w in seen if w[0] == "failure"] == [[failing.id, "KeyError", "True"]]
    handlers = sorted((w[0], w[1], w[2]) for w in seen if w[0].startswith("on_"))
    assert handlers == sorted([("on_success", ok.id, "ok"), ("on_success", retried.id, "retry"),
                               ("on_failure", failing.id, "KeyError"),
                               ("on_retry", retried.id, "ValueError")])
    assert worker.log().count("before_task hook") == 4
    assert "a hook that always fails" in worker.log()


def test_headers_added_on_send_reach_the_task(
        make_app: Callable[..., App], hook_log: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    tasks = hooked.build(make_app())
    start_worker(app="tests.apps.hooked:app", env={"HOOK_LOG": str(hook_log)})
    assert tasks["tenant"].delay().get(timeout=15) == "acme"


def test_hooks_run_in_eager_mode_too(hook_log: Path, tmp_path: Path) -> None:
    tasks = hooked.build(App(f"sqlite:///{tmp_path}/unused.db", eager=True))
    assert tasks["tenant"].delay().get() == "acme"
    assert tasks["audited"].delay("ok").get() == "ok"
    assert [w[0] for w in _lines(hook_log)] == ["before", "after", "before", "on_success",
                                                 "after"]


def test_a_failing_slot_start_hook_is_logged_and_the_slot_serves(
        make_app: Callable[..., App], hook_log: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    tasks = hooked.build(make_app())
    worker = start_worker(app="tests.apps.hooked:app", concurrency=1,
                          env={"HOOK_LOG": str(hook_log / "missing-dir" / "file")})
    assert tasks["tenant"].delay().get(timeout=15) == "acme"  # every hook fails to write
    assert "on_slot_start hook" in worker.log() and "on_worker_start hook" in worker.log()


def test_base_must_be_a_task_class(make_app: Callable[..., App]) -> None:
    with pytest.raises(taskq.ConfigurationError, match="must be a subclass of taskq.Task"):
        make_app().task(base=object)(hooked.note)  # type: ignore[call-overload]
