"""The measurements themselves: each takes a connected client and returns plain numbers."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from .places import Place
from .procs import WorkerProcess, tree_memory
from .systems import Client, Result, System

#: Upper bound on waiting for any one result; a healthy run never comes close.
RESULT_TIMEOUT = 60.0
#: Upper bound on a worker's start-up (first result, or all consumers up).
STARTUP_TIMEOUT = 90.0


def percentile(values: list[float], pct: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def check(result: Result, expected: int) -> None:
    value = result.get(timeout=RESULT_TIMEOUT)
    if value != expected:
        raise AssertionError(f"add returned {value!r}, expected {expected}")


# -- with a worker running ------------------------------------------------------------------------


def start_worker(system: System, place: Place, queue: str, log_path: Path) -> WorkerProcess:
    argv = system.worker_argv(place.url, queue)
    return WorkerProcess(argv, system.worker_env(place.url), log_path)


def wait_ready(system: System, place: Place, queue: str, worker: WorkerProcess) -> None:
    place.wait_ready(queue, system.ready_count, worker, STARTUP_TIMEOUT)


def startup(
    system: System, client: Client, place: Place, queue: str, log_path: Path
) -> tuple[WorkerProcess, float]:
    """Spawn the worker and send one task at once; seconds until its result is back."""
    started = time.perf_counter()
    worker = start_worker(system, place, queue, log_path)
    result = client.delay(1, 1)
    deadline = started + STARTUP_TIMEOUT
    while True:
        try:
            value = result.get(timeout=0.05)
            break
        except client.timeout_errors:
            worker.check_alive()
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{system.name} worker gave no result in time") from None
    elapsed = time.perf_counter() - started
    if value != 2:
        raise AssertionError(f"add(1, 1) returned {value!r}")
    return worker, elapsed


def round_trips(client: Client, calls: int, warmup: int) -> dict[str, float]:
    """``delay(i, 1).get()`` one at a time: p50/p99 in milliseconds."""
    for i in range(warmup):
        check(client.delay(i, 1), i + 1)
    times = []
    for i in range(calls):
        started = time.perf_counter()
        check(client.delay(i, 1), i + 1)
        times.append(time.perf_counter() - started)
    return {
        "rt_p50_ms": percentile(times, 50) * 1000,
        "rt_p99_ms": percentile(times, 99) * 1000,
        "rt_mean_ms": sum(times) / len(times) * 1000,
    }


def throughput(client: Client, tasks: int, cpu: Callable[[], dict[str, float]]) -> dict[str, float]:
    """All ``delay`` calls, then all ``get``s: tasks per second end to end.

    ``cpu()`` gives CPU seconds used so far by the client, the worker and the broker (if the
    system has one): reported as microseconds per task, and their total.
    """
    cpu_before = cpu()
    started = time.perf_counter()
    results = [client.delay(i, 1) for i in range(tasks)]
    sent = time.perf_counter()
    for i, result in enumerate(results):
        check(result, i + 1)
    done = time.perf_counter()
    cpu_after = cpu()
    figures = {
        "throughput_per_s": tasks / (done - started),
        "throughput_send_per_s": tasks / (sent - started),
    }
    for side, seconds in cpu_after.items():
        figures[f"cpu_us_{side}"] = (seconds - cpu_before[side]) / tasks * 1e6
    figures["cpu_us_total"] = sum(figures[f"cpu_us_{side}"] for side in cpu_after)
    return figures


def run_tasks(client: Client, tasks: int, batch: int = 1000) -> None:
    """Push ``tasks`` through the worker in batches (bounded client memory)."""
    for first in range(0, tasks, batch):
        count = min(batch, tasks - first)
        results = [client.delay(first + i, 1) for i in range(count)]
        for i, result in enumerate(results):
            check(result, first + i + 1)


def worker_memory(worker: WorkerProcess) -> dict[str, float]:
    return tree_memory(worker.pid)


# -- without a worker -----------------------------------------------------------------------------


def enqueue_rate(client: Client, tasks: int) -> float:
    """Single confirmed ``delay()`` calls, no worker running: tasks per second."""
    started = time.perf_counter()
    for i in range(tasks):
        client.delay(i, 1)
    return tasks / (time.perf_counter() - started)


def bulk_rate(client: Client, tasks: int) -> float | None:
    """The system's bulk path (see System.bulk_method); None when it has none."""
    args = [(i, 1) for i in range(tasks)]
    started = time.perf_counter()
    if not client.bulk(args):
        return None
    return tasks / (time.perf_counter() - started)


# -- interleaved: every system measured in the same stretch of time ---------------------------


def _rotations(names: list[str], blocks: int) -> list[list[str]]:
    """Block order A B C, B C A, C A B, ...: no system always goes first."""
    return [names[b % len(names):] + names[:b % len(names)] for b in range(blocks)]


def interleaved_round_trips(
    clients: dict[str, Client], calls: int, block: int, warmup: int
) -> dict[str, dict[str, float]]:
    """Round trips in blocks of ``block`` per system, alternating: p50/p99 (ms) per system.

    A slow stretch of the machine then hits every system alike, instead of whichever one
    happened to be measured then.
    """
    for client in clients.values():
        for i in range(warmup):
            check(client.delay(i, 1), i + 1)
    times: dict[str, list[float]] = {name: [] for name in clients}
    for order in _rotations(list(clients), calls // block):
        for name in order:
            client = clients[name]
            for i in range(block):
                started = time.perf_counter()
                check(client.delay(i, 1), i + 1)
                times[name].append(time.perf_counter() - started)
    return {
        name: {"rt_p50_ms": percentile(t, 50) * 1000, "rt_p99_ms": percentile(t, 99) * 1000}
        for name, t in times.items()
    }


def interleaved_enqueue(clients: dict[str, Client], tasks: int, block: int) -> dict[str, float]:
    """Confirmed single enqueues (no worker) in alternating blocks: tasks/s per system."""
    spent = dict.fromkeys(clients, 0.0)
    blocks = tasks // block
    for order in _rotations(list(clients), blocks):
        for name in order:
            client = clients[name]
            started = time.perf_counter()
            for i in range(block):
                client.delay(i, 1)
            spent[name] += time.perf_counter() - started
    return {name: blocks * block / seconds for name, seconds in spent.items()}
