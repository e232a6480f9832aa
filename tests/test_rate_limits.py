"""Rate limits: ``rate_limit="5/s"`` starts a task at most once per 0.2 s, per worker or for
all workers; a task that may not start yet waits in the broker while the slot takes other
work (real broker and workers, both brokers)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

import taskq
from taskq import App

from .apps import basic, rated
from .support import Broker, WorkerProcess, lines

#: How much closer than a full interval two stamps may be: the broker marks a start a little
#: before the task stamps it (a busy machine may delay one stamp more than the next). Two
#: starts admitted at once would be ~0 s apart.
SLACK = 0.1


def _starts(path: Path) -> dict[str, float]:
    words = lines(path)
    return {words[i]: float(words[i + 1]) for i in range(0, len(words), 2)}


def _check_paced(path: Path, tokens: list[str]) -> list[float]:
    starts = _starts(path)
    assert sorted(starts) == sorted(tokens) and len(lines(path)) == 2 * len(tokens)
    moments = sorted(starts.values())
    gaps = [b - a for a, b in itertools.pairwise(moments)]
    assert min(gaps) >= rated.INTERVAL - SLACK, gaps
    return moments


def test_a_rate_limited_task_starts_once_per_interval_and_the_slots_take_other_work(
        make_app: Callable[..., App], broker: Broker, queue: str, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given 8 tasks limited to 5/s queued before an unlimited one, when a worker with 2
    slots runs them, then no two limited ones start within 0.2 s of each other, each runs
    once, and the unlimited one is done before the last limited one starts."""
    tasks: SimpleNamespace = rated.build(make_app())
    start_worker(app="tests.apps.rated:app")
    path = tmp_path / "starts"
    tokens = [f"t{i}" for i in range(8)]
    results = tasks.paced.delay_many([(str(path), t) for t in tokens])
    assert tasks.add.delay(1, 1).get(timeout=15) == 2
    quick_done = time.time()
    for result in results:
        result.get(timeout=30)
    moments = _check_paced(path, tokens)
    assert quick_done < moments[-1], "the unlimited task waited behind the limited ones"
    assert broker.counts(queue) == (0, 2) and broker.dead_letter_count(queue) == 0


def test_a_global_rate_limit_holds_across_workers(
        make_app: Callable[..., App], broker: Broker, queue: str, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    tasks: SimpleNamespace = rated.build(make_app())
    for _ in range(2):
        start_worker(app="tests.apps.rated:app", concurrency=1)
    path = tmp_path / "starts"
    tokens = [f"g{i}" for i in range(8)]
    for result in tasks.paced_globally.delay_many([(str(path), t) for t in tokens]):
        result.get(timeout=30)
    _check_paced(path, tokens)
    assert broker.counts(queue) == (0, 2) and broker.dead_letter_count(queue) == 0


@pytest.mark.parametrize("rate", ["fast", "0/s", "-1/m", 0, "10/d", True])
def test_a_malformed_rate_limit_is_a_clear_error(rate: object) -> None:
    with pytest.raises(taskq.ConfigurationError, match="rate_limit must be a positive rate"):
        App("sqlite:///unused.db").task(rate_limit=rate)(basic.add)  # type: ignore[call-overload]


def test_an_unknown_scope_is_a_clear_error() -> None:
    with pytest.raises(taskq.ConfigurationError, match="rate_limit_scope must be one of"):
        App("sqlite:///unused.db").task(rate_limit="1/s", rate_limit_scope="planet")(  # type: ignore[call-overload]
            basic.add)
