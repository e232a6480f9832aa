"""Test modes: ``App(eager=True)`` and ``task.apply()`` run a task in the calling process,
through the same encoding as a worker, and return an EagerResult with AsyncResult's API.

No broker: these tests also prove that nothing is created or connected to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import taskq
from taskq import App, EagerResult

from .apps import basic


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/never-created.db"


@pytest.fixture
def eager(url: str, tmp_path: Path) -> Any:
    app = App(url, eager=True, exceptions=[basic.CustomError])
    yield basic.build(app)
    assert not (tmp_path / "never-created.db").exists(), "eager mode touched the broker"


def test_delay_runs_the_task_here_and_returns_its_result(eager: Any) -> None:
    result = eager.add.delay(2, 3)
    assert isinstance(result, EagerResult) and isinstance(result, taskq.AsyncResult)
    assert result.get(timeout=1) == 5
    assert (result.state, result.ready(), result.successful(), result.failed()) == (
        "SUCCESS", True, True, False)
    assert result.result == 5 and result.traceback is None


def test_values_come_back_as_a_worker_would_send_them(eager: Any) -> None:
    assert eager.echo.delay((1, (2, 3))).get() == [1, [2, 3]]  # JSON has no tuples


def test_arguments_json_cannot_carry_fail_as_delay_would(eager: Any) -> None:
    with pytest.raises(taskq.EncodeError, match="arguments of task tests.apps.basic.echo"):
        eager.echo.delay(object())
    with pytest.raises(TypeError, match=r"add\(x, y\)"):
        eager.add.delay(1)


def test_a_message_over_the_size_bound_fails_as_delay_would(url: str) -> None:
    tasks = basic.build(App(url, eager=True, max_message_size=1024))
    with pytest.raises(taskq.MessageTooLarge, match="over max_message_size=1,024"):
        tasks.echo.delay("x" * 2000)


def test_failures_are_rebuilt_as_for_a_worker(eager: Any) -> None:
    with pytest.raises(ValueError, match="bad value"):
        eager.fail.delay("ValueError", "bad value").get()
    with pytest.raises(basic.CustomError, match="registered"):  # registered with the app
        eager.fail.delay("Custom", "registered").get()
    failed = eager.fail.delay("KeyError", "k")
    assert failed.failed() and isinstance(failed.result, KeyError)
    assert "raise KeyError(message)" in (failed.traceback or "")
    assert isinstance(failed.get(propagate=False), KeyError)


def test_an_unregistered_exception_type_arrives_as_remote_error(url: str) -> None:
    tasks = basic.build(App(url, eager=True))
    with pytest.raises(taskq.RemoteError) as caught:
        tasks.fail.delay("Custom", "not registered").get()
    assert caught.value.exc_type == "CustomError"


def test_a_retrying_task_runs_again_at_once_until_it_succeeds(
        eager: Any, tmp_path: Path) -> None:
    log = tmp_path / "runs"
    assert eager.flaky.delay(str(log), 2).get() == [2]  # countdowns are not waited for
    assert [line.split()[1] for line in log.read_text().splitlines()] == ["0", "1", "2"]
    with pytest.raises(ConnectionError):  # autoretry: max_retries=3, then the error
        eager.unreliable.delay(str(tmp_path / "unreliable")).get()
    assert len((tmp_path / "unreliable").read_text().splitlines()) == 4


def test_ignore_result_keeps_no_result_as_a_worker_would(eager: Any, tmp_path: Path) -> None:
    result = eager.record.apply_async((str(tmp_path / "ran"), "t"), ignore_result=True)
    assert (tmp_path / "ran").read_text() == "t\n"
    with pytest.raises(taskq.ResultUnavailable):
        result.get()


def test_a_task_sent_by_a_name_nobody_registered_fails_not_registered(url: str) -> None:
    app = App(url, eager=True)
    with pytest.raises(taskq.NotRegistered, match="no task named 'nope'"):
        app.send_task("nope", (1,)).get()


def test_apply_runs_here_on_an_app_that_sends(url: str, tmp_path: Path) -> None:
    tasks = basic.build(App(url))
    result = tasks.add.apply((4, 5))
    assert isinstance(result, EagerResult) and result.get() == 9
    assert tasks.add.apply(kwargs={"x": 1, "y": 1}).get() == 2
    assert result.id and tasks.add.apply((1, 1), task_id="fixed").id == "fixed"
    assert not (tmp_path / "never-created.db").exists()


def test_a_bound_task_sees_its_request(url: str, tmp_path: Path) -> None:
    tasks = basic.build(App(url, eager=True))
    log = tmp_path / "runs"
    result = tasks.flaky.delay(str(log), 0)
    request_id, retries, redelivered = log.read_text().split()
    assert (request_id, retries, redelivered) == (result.id, "0", "False")
