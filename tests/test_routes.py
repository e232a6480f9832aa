"""Routes: glob patterns on task names choose the queue (first match wins); a call's queue=
and a task's own queue= win over routes (real broker and workers, both brokers)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import taskq
from taskq import App

from .apps import basic
from .support import Broker, WorkerProcess, lines


def test_a_route_sends_a_task_to_its_queue_where_a_worker_runs_it(
        make_app: Callable[..., App], broker: Broker, queue: str, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given routes {"tests.apps.basic.rec*": <queue>-io}, when record is sent, then it
    waits in <queue>-io (not in the default queue) and a worker of that queue runs it."""
    io = f"{queue}-io"
    tasks = basic.build(make_app(routes={"tests.apps.basic.rec*": io}))
    path = tmp_path / "ran"
    result = tasks.record.delay(str(path), "routed")
    assert broker.counts(io)[0] == 1
    assert not broker.exists(queue) or broker.counts(queue)[0] == 0
    start_worker(queues=[io])
    assert result.get(timeout=15) == "routed" and lines(path) == ["routed"]
    assert broker.counts(io) == (0, 2) and broker.dead_letter_count(io) == 0


def test_the_first_matching_route_wins_and_unmatched_tasks_use_the_default(
        make_app: Callable[..., App], broker: Broker, queue: str) -> None:
    first, second = f"{queue}-first", f"{queue}-second"
    app = make_app(routes={"tests.apps.basic.a*": first, "tests.apps.*": {"queue": second}})
    tasks = basic.build(app)
    tasks.add.delay(1, 2)        # matches both: the first wins
    tasks.echo.delay(1)          # matches the second only
    app.send_task("other.task")  # by name, no route: the default queue
    assert (broker.counts(first)[0], broker.counts(second)[0], broker.counts(queue)[0]) == (
        1, 1, 1)


def test_a_calls_queue_and_a_tasks_own_queue_win_over_routes(
        make_app: Callable[..., App], broker: Broker, queue: str) -> None:
    routed, own, call = f"{queue}-routed", f"{queue}-own", f"{queue}-call"
    app = make_app(routes={"*": routed})
    pinned = app.task(name="tests.apps.basic.add", queue=own)(basic.add)
    pinned.delay(1, 1)
    pinned.apply_async((1, 1), queue=call)
    app.send_task("tests.apps.basic.echo", (1,), queue=call)
    app.send_task("tests.apps.basic.echo", (1,))
    assert [broker.counts(q)[0] for q in (own, call, routed)] == [1, 2, 1]


@pytest.mark.parametrize(("routes", "message"), [
    ({"images.*": ""}, "route 'images.*' must name a queue"),
    ({"images.*": {"queue": "q", "exchange": "x"}}, "unknown key(s) exchange"),
    ({"": "q"}, "a route's key must be a task-name pattern"),
    (["images.*"], "routes must be a mapping"),
])
def test_a_malformed_route_is_a_clear_error(routes: object, message: str) -> None:
    with pytest.raises(taskq.ConfigurationError, match=message.replace("(", r"\(")
                       .replace(")", r"\)").replace("*", r"\*").replace(".", r"\.")):
        App("sqlite:///unused.db", routes=routes)  # type: ignore[arg-type]
