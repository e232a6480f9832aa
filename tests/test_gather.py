"""Waiting on many results at once: ``taskq.gather`` (values in order) and ``taskq.as_completed``
(each handle as it finishes), on both brokers with real workers; and the progress bar, drawn
only on a terminal."""

from __future__ import annotations

import builtins
import os
import pty
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import taskq
from taskq import App, AsyncResult
from taskq.replies import Pending

from .apps import basic
from .support import ROOT, WorkerProcess


@pytest.fixture
def worker(start_worker: Callable[..., WorkerProcess]) -> WorkerProcess:
    return start_worker()


@pytest.fixture
def release(tmp_path: Path) -> Any:
    """A file a ``wait_for_file`` task waits for; created after the test in any case, so the
    worker is not left holding a blocked task when it is stopped."""
    path = tmp_path / "release"
    yield path
    path.touch()


# -- with real workers, on both brokers ------------------------------------------------------------


def test_gather_returns_the_values_in_the_order_of_the_handles(
        tasks: SimpleNamespace, worker: WorkerProcess) -> None:
    results = [tasks.add.delay(i, i) for i in range(50)]
    # given the same handle twice, and handles in another order than sent
    handles = results[::-1] + results[:3]
    assert taskq.gather(handles, timeout=20) == [2 * i for i in range(49, -1, -1)] + [0, 2, 4]
    assert taskq.gather([], timeout=1) == []


def test_a_failure_is_raised_or_with_propagate_false_returned_in_place(
        tasks: SimpleNamespace, worker: WorkerProcess) -> None:
    results = [tasks.add.delay(1, 1), tasks.fail.delay("Custom", "boom"), tasks.add.delay(2, 2)]
    with pytest.raises(taskq.RemoteError, match="CustomError: boom") as caught:
        taskq.gather(results, timeout=20)
    assert "raise CustomError(message)" in (caught.value.remote_traceback or "")

    more = [*results, tasks.fail.delay("ValueError", "bad"), tasks.add.delay(3, 3)]
    values = taskq.gather(more, timeout=20, propagate=False)
    assert values[0] == 2 and values[2] == 4 and values[4] == 6
    assert isinstance(values[1], taskq.RemoteError) and values[1].exc_type == "CustomError"
    assert isinstance(values[3], ValueError) and str(values[3]) == "bad"
    # when several failures are in already, the first in list order is raised
    with pytest.raises(taskq.RemoteError, match="boom"):
        taskq.gather([more[2], more[1], more[3]], timeout=1)
    with pytest.raises(ValueError, match="bad"):
        taskq.gather([more[4], more[3], more[1]], timeout=1)


def test_a_failure_is_raised_without_waiting_for_the_rest(
        tasks: SimpleNamespace, worker: WorkerProcess, release: Path) -> None:
    blocked = tasks.wait_for_file.delay(str(release))  # never finishes on its own
    failing = tasks.fail.delay("KeyError", "missing")
    started = time.monotonic()
    with pytest.raises(KeyError, match="missing"):
        taskq.gather([blocked, failing], timeout=20)
    assert time.monotonic() - started < 10 and not blocked.ready()


def test_the_timeout_bounds_the_whole_call_and_names_what_is_pending(
        tasks: SimpleNamespace, worker: WorkerProcess, release: Path) -> None:
    done = [tasks.add.delay(i, 1) for i in range(3)]
    taskq.gather(done, timeout=20)
    blocked = tasks.wait_for_file.delay(str(release))  # holds one slot
    quick = tasks.add.delay(5, 5)
    assert quick.get(timeout=20) == 10  # on the other slot
    handles = [*done, blocked, quick]

    started = time.monotonic()
    with pytest.raises(taskq.TimeoutError) as caught:
        taskq.gather(handles, timeout=1.0)
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 2.0
    assert isinstance(caught.value, builtins.TimeoutError)
    message = str(caught.value)
    assert "1 of 5 tasks gave no result within 1s" in message
    assert f"wait_for_file[{blocked.id}]" in message

    started = time.monotonic()
    with pytest.raises(taskq.TimeoutError, match="as_completed: 1 of 5 tasks"):
        list(taskq.as_completed(handles, timeout=0.5))
    assert 0.5 <= time.monotonic() - started < 1.5

    release.touch()  # and the handles still work: gather can be called again
    assert taskq.gather(handles, timeout=20)[:3] == [1, 2, 3]


def test_as_completed_yields_each_handle_once_as_it_finishes(
        tasks: SimpleNamespace, worker: WorkerProcess, release: Path) -> None:
    # given a slow task first in the list (it waits for the test), then quick ones
    slow = tasks.wait_for_file.delay(str(release))
    quick = [tasks.add.delay(i, i) for i in range(10)]
    handles = [slow, *quick, quick[0]]
    seen: list[AsyncResult[Any]] = []
    for handle in taskq.as_completed(handles, timeout=20):
        assert handle.ready()
        seen.append(handle)
        if len(seen) == len(quick) + 1:  # every quick one (one of them twice) is out
            release.touch()
    assert seen[-1] is slow
    assert sorted(map(id, seen)) == sorted(map(id, handles))
    assert seen.count(quick[0]) == 2


def test_results_of_several_apps_are_gathered_together(
        tasks: SimpleNamespace, make_app: Callable[..., App], worker: WorkerProcess) -> None:
    other = basic.build(make_app())
    handles = [tasks.add.delay(1, 1), other.add.delay(2, 2), tasks.add.delay(3, 3)]
    assert taskq.gather(handles, timeout=20) == [2, 4, 6]


# -- no broker: eager results, handles filed from another thread -----------------------------------


@pytest.fixture
def eager(tmp_path: Path) -> SimpleNamespace:
    return basic.build(App(f"sqlite:///{tmp_path}/never-created.db", eager=True))


def test_eager_results_are_gathered_and_completed(eager: SimpleNamespace) -> None:
    results = [eager.add.delay(i, 1) for i in range(5)]
    assert taskq.gather([*results, results[0]]) == [1, 2, 3, 4, 5, 1]
    assert list(taskq.as_completed(results)) == results  # all in already: in list order
    with pytest.raises(ValueError, match="no"):
        taskq.gather([results[0], eager.fail.delay("ValueError", "no")])


def test_a_task_sent_with_ignore_result_is_refused_at_once(eager: SimpleNamespace) -> None:
    ignored = eager.add.apply_async((1, 2), ignore_result=True)
    with pytest.raises(taskq.ResultUnavailable, match="position 1.*ignore_result"):
        taskq.gather([eager.add.delay(1, 1), ignored])
    with pytest.raises(taskq.ResultUnavailable):
        taskq.as_completed([ignored])  # at the call, not at the first next()


def test_ten_thousand_results_filed_by_another_thread_are_gathered_quickly() -> None:
    """What the reply consumer does, without a broker: results filed from another thread,
    in bursts, in any order; gather's cost follows the results, not handles x wake-ups."""
    pendings = [Pending(f"t{i}") for i in range(10_000)]
    handles: list[AsyncResult[int]] = [AsyncResult(p.task_id, "n", p, None) for p in pendings]

    def file_all() -> None:
        for start in range(0, len(pendings), 50):
            for i in reversed(range(start, start + 50)):
                pendings[i].resolve({"status": "SUCCESS", "result": i})

    filer = threading.Thread(target=file_all)
    started = time.monotonic()
    filer.start()
    assert taskq.gather(handles, timeout=20) == list(range(10_000))
    filer.join()
    assert time.monotonic() - started < 5
    assert all(p.wakers == [] for p in pendings)  # nothing left behind


# -- the progress bar ---------------------------------------------------------------------------


def test_progress_writes_nothing_when_stderr_is_not_a_terminal(
        eager: SimpleNamespace, capfd: pytest.CaptureFixture[str]) -> None:
    results = [eager.add.delay(i, i) for i in range(20)] + [eager.fail.delay("KeyError", "k")]
    values = taskq.gather(results, progress=True, propagate=False)
    assert values[:20] == [2 * i for i in range(20)] and isinstance(values[20], KeyError)
    assert capfd.readouterr() == ("", "")


PTY_SCRIPT = """
import sys, taskq
from taskq import App
from tests.apps import basic

tasks = basic.build(App(sys.argv[1], eager=True))
results = [tasks.add.delay(i, i) for i in range(20)] + [tasks.fail.delay("KeyError", "k")]
values = taskq.gather(results, progress=True, propagate=False)
print(values[:3], file=sys.stdout)
"""


def test_progress_draws_a_bar_with_counts_and_rate_on_a_terminal(tmp_path: Path) -> None:
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", PTY_SCRIPT, f"sqlite:///{tmp_path}/none.db"], cwd=ROOT,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave,
        )
        os.close(slave)
        drawn = _read_until_closed(master, deadline=time.monotonic() + 20)
        out, _ = proc.communicate(timeout=20)
    finally:
        os.close(master)
    assert proc.returncode == 0, drawn
    assert out.decode().strip() == "[0, 2, 4]"  # stdout untouched
    assert "[####" in drawn and "21/21 done, 1 failed" in drawn and "tasks/s" in drawn


def _read_until_closed(fd: int, deadline: float) -> str:
    """Everything written to the terminal until its last writer closes it."""
    chunks = []
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([fd], [], [], left)[0]:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the slave side is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")
