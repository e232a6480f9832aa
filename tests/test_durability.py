"""Durability: tasks queued while no worker runs survive a broker restart."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from .support import Broker, WorkerProcess, lines


@pytest.mark.slow
@pytest.mark.rabbitmq
def test_queued_tasks_survive_a_broker_restart(
        tasks: SimpleNamespace, broker: Broker, queue: str, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given 50 tasks queued with no worker running, when RabbitMQ is restarted
    (stop_app/start_app), then a worker started afterwards runs each exactly once, and the
    results reach the caller through its reply queue, which survived too."""
    effects = tmp_path / "effects"
    results = [tasks.record.delay(str(effects), f"t{i}") for i in range(50)]
    assert broker.counts(queue)[0] == 50
    broker.restart()
    assert broker.counts(queue)[0] == 50
    start_worker()
    assert [r.get(timeout=60) for r in results] == [f"t{i}" for i in range(50)]
    assert sorted(lines(effects)) == sorted(f"t{i}" for i in range(50))
