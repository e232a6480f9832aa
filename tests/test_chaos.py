"""Chaos, for real: slots, workers and RabbitMQ itself SIGKILLed while tasks are queued.

Both tests boot a throwaway RabbitMQ node of their own (``rabbit_node.py``) and crash it with
SIGKILL of its Erlang VM, then boot it again on the same data: the machine's main broker is
not touched.  After such a crash RabbitMQ marks every recovered persistent message
``redelivered``, also the ones it never delivered to anyone; a task that never ran must not be
counted as a run cut short for that.  The harness is ``chaos.py``; ``benchmarks/chaos.py``
runs the same for longer.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .chaos import (
    ChaosSettings,
    ChaosWorker,
    Client,
    check,
    read_effects,
    run_chaos,
    wait_consuming,
    wait_drained,
)
from .rabbit_node import AmqpNode, amqp_node
from .support import unique, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.rabbitmq]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[AmqpNode]:
    """A plain-AMQP RabbitMQ node of this test's own; its logs are kept in tmp_path."""
    with amqp_node(tmp_path, logs_to=tmp_path / "node-logs") as node:
        print(f"\nnode {node.name} booted in {node.start_seconds:.1f}s")
        yield node


@pytest.mark.timeout(180)
def test_random_kills_of_slots_workers_and_the_broker_lose_no_task_and_no_result(
        node: AmqpNode, tmp_path: Path) -> None:
    """Given 300 tasks queued for 2 workers x 2 slots, while slot processes, whole workers
    and the broker are SIGKILLed at random every 2-4 s (at least 3 of each, the broker's
    spread over the ~40 s), every confirmed task runs and every caller gets its correct
    result; nothing is dead-lettered and no queue keeps a message.

    Seeded: the seed is printed; TASKQ_CHAOS_SEED=N replays the same kill plan."""
    seed = os.environ.get("TASKQ_CHAOS_SEED")
    settings = ChaosSettings(
        tasks=300, workers=2, slots=2, chaos_seconds=40, bursts=1, task_ms=600,
        at_least={"broker": 3, "worker": 3, "slot": 3},
        result_timeout=60, seed=int(seed) if seed else None,
    )
    report = run_chaos(node, settings, tmp_path / "chaos")
    assert not report.harness_problems, report.format()
    assert not report.never_executed, report.format()
    assert not report.incorrect, report.format()
    assert report.ok, report.format()


@pytest.mark.timeout(150)
def test_a_backlog_that_never_ran_is_not_dead_lettered_by_three_broker_crashes(
        node: AmqpNode, tmp_path: Path) -> None:
    """Given 150 tasks queued for a worker with one slot, when RabbitMQ crashes 3 times
    (first before any worker ran, then each time after the worker had reconnected, taken the
    backlog back and run a few of them), every caller still gets its correct result: the
    tasks that never ran are not "lost runs", none is dead-lettered as poison, and none of
    the callers gets WorkerLostError."""
    queue = unique("backlog")
    effects = tmp_path / "effects.log"
    client = Client(node.url, queue, effects, task_ms=20)
    worker = ChaosWorker(1, node.url, queue, slots=1, work_dir=tmp_path)

    def crash() -> None:
        pid = node.kill()
        took = node.start()
        print(f"SIGKILL broker (beam.smp {pid}); back after {took:.1f}s of boot")

    def ran() -> int:
        return read_effects(effects).total_ends

    try:
        deadline = time.monotonic() + 30
        for i in range(150):
            assert client.send(f"b{i:03d}", deadline)
        assert node.queue_counts(queue) == (150, 0)  # queued, delivered to no one
        node.settle()
        crash()
        assert node.queue_counts(queue) == (150, 0), (
            "RabbitMQ itself lost the queue or its messages in the crash (before any worker "
            "ran): not something taskq did")
        worker.start()
        wait_consuming(node, queue, 1, 60, [worker])
        for _ in range(2):
            before = ran()
            wait_for(lambda before=before: ran() >= before + 3, 60,
                     "the worker to reconnect, take the backlog back and run 3 more tasks")
            crash()
        started = time.monotonic()
        outcomes = client.collect(60)
        report = check(node=node, queue=queue, client=client, outcomes=outcomes,
                       effects=read_effects(effects), queues=wait_drained(node, queue, 15),
                       kills={"broker": node.kills}, settings="150 tasks, 1 worker x 1 slot, "
                       "3 broker SIGKILLs", seconds={"results": time.monotonic() - started})
    finally:
        worker.stop()
        client.close()
    print(report.format())
    assert report.outcomes.get("WorkerLostError", 0) == 0, report.format()
    assert not report.incorrect, report.format()
    assert report.dlq == 0, report.format()
    assert not report.never_executed, report.format()
    assert report.ok, report.format()
