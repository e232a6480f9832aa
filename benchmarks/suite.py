"""One benchmark run: every system on the same machine, in alternating rounds.

The RabbitMQ systems get a vhost each on the local broker, the embedded ones a fresh file
each (places.py); a run of embedded systems only never touches RabbitMQ.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import json
import os
import platform
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import measure, report
from .cpu import CpuMeter
from .places import Place
from .procs import ROOT, WorkerProcess, kill_all
from .systems import HUEY_POLL, SLOTS, SYSTEMS, Client, System, make_systems

RESULTS = Path(__file__).resolve().parent / "results"
QUEUE = "bench"
#: How many times a phase is repeated because the broker restarted under it.
BROKER_RESTARTS = 3


@dataclass(frozen=True)
class Sizes:
    rounds: int
    warmup: int
    round_trips: int
    throughput: int
    enqueue: int
    bulk: int
    memory_tasks: int
    #: The interleaved phase: round trips and enqueues per system, and the block size.
    interleaved_round_trips: int
    interleaved_enqueue: int


FULL = Sizes(rounds=5, warmup=30, round_trips=300, throughput=3000, enqueue=2000, bulk=3000,
             memory_tasks=10_000, interleaved_round_trips=1200,
             interleaved_enqueue=4000)  # fmt: skip
QUICK = Sizes(rounds=1, warmup=5, round_trips=30, throughput=200, enqueue=200, bulk=200,
              memory_tasks=500, interleaved_round_trips=60, interleaved_enqueue=300)  # fmt: skip
#: Calls per system before the next system's turn, in the interleaved phase.
RT_BLOCK = 20
ENQUEUE_BLOCK = 100


@dataclass
class Bench:
    """One system's live state for the run: its place and a connected client."""

    system: System
    place: Place
    client: Client | None = None

    @property
    def name(self) -> str:
        return self.system.name

    def log_path(self, what: str) -> Path:
        return RESULTS / "logs" / f"{self.name}-{what}.log"


def say(message: str) -> None:
    print(message, flush=True)


# -- setup and teardown ---------------------------------------------------------------------------


def open_bench(bench: Bench) -> None:
    bench.place.create()
    connect_client(bench)


def connect_client(bench: Bench) -> None:
    bench.client = bench.system.client(bench.place.url, QUEUE)
    bench.client.delay(0, 0)  # connect, declare the queue and the reply queue...
    bench.place.purge(QUEUE)  # ...and drop that task: no worker will see it


def close_bench(bench: Bench) -> None:
    close_client(bench)
    bench.place.delete()


def close_client(bench: Bench) -> None:
    if bench.client is not None:
        with contextlib.suppress(Exception):
            bench.client.close()
        bench.client = None


def recover(benches: list[Bench], exc: BaseException) -> None:
    """The broker restarted under a phase: wait for it, then reconnect every client."""
    say(f"  the broker restarted ({exc!r}); waiting for it, then repeating this phase")
    kill_all()
    for bench in benches:
        close_client(bench)
        bench.place.wait_reachable()
        connect_client(bench)


def repeat_if_broker_restarts(
    benches: list[Bench], bench: Bench, phase: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """Run ``phase``; if the broker restarted meanwhile (another user of this machine
    restarting RabbitMQ), its figures are void: run it again on fresh connections."""
    for attempt in range(BROKER_RESTARTS + 1):
        try:
            figures = phase()
        except Exception as exc:
            if attempt == BROKER_RESTARTS or not bench.place.connection_lost():
                raise
            recover(benches, exc)
            continue
        if bench.place.connection_lost():  # restarted in the last moment: still void
            recover(benches, RuntimeError("admin connection lost"))
            continue
        figures["broker_restarts"] = attempt
        return figures
    raise RuntimeError("unreachable")


def stop_worker(bench: Bench, worker: WorkerProcess) -> None:
    worker.stop()
    bench.place.wait_stopped(QUEUE)


# -- phases ---------------------------------------------------------------------------------------


def run_round(bench: Bench, sizes: Sizes, round_no: int, meter: CpuMeter) -> dict[str, Any]:
    """Start-up, latency and throughput with a worker; then enqueue rates without one."""
    client, place = bench.client, bench.place
    assert client is not None
    place.purge(QUEUE)
    log_path = bench.log_path(f"r{round_no}")
    worker, startup_s = measure.startup(bench.system, client, place, QUEUE, log_path)
    figures: dict[str, Any] = {"round": round_no, "system": bench.name, "startup_s": startup_s}
    try:
        measure.wait_ready(bench.system, place, QUEUE, worker)
        memory = measure.worker_memory(worker)
        figures["idle_rss_mb"], figures["idle_pss_mb"] = memory["rss_mb"], memory["pss_mb"]
        figures.update(measure.round_trips(client, sizes.round_trips, sizes.warmup))
        cpu = functools.partial(meter.split, worker.pid, broker=place.needs_rabbitmq)
        figures.update(measure.throughput(client, sizes.throughput, cpu))
    finally:
        stop_worker(bench, worker)
    figures["enqueue_per_s"] = measure.enqueue_rate(client, sizes.enqueue)
    place.purge(QUEUE)
    figures["bulk_per_s"] = measure.bulk_rate(client, sizes.bulk)
    place.purge(QUEUE)
    return figures


def memory_phase(bench: Bench, sizes: Sizes) -> dict[str, Any]:
    """One worker: memory after start-up and one task, then after ``memory_tasks`` more."""
    client, place = bench.client, bench.place
    assert client is not None
    place.purge(QUEUE)
    worker, _ = measure.startup(bench.system, client, place, QUEUE, bench.log_path("memory"))
    try:
        measure.wait_ready(bench.system, place, QUEUE, worker)
        idle = measure.worker_memory(worker)
        started = time.perf_counter()
        measure.run_tasks(client, sizes.memory_tasks)
        elapsed = time.perf_counter() - started
        after = measure.worker_memory(worker)
    finally:
        stop_worker(bench, worker)
    return {
        "idle_rss_mb": idle["rss_mb"],
        "idle_pss_mb": idle["pss_mb"],
        "after_rss_mb": after["rss_mb"],
        "after_pss_mb": after["pss_mb"],
        "processes": after["processes"],
        "tasks_per_s": sizes.memory_tasks / elapsed,
    }


def interleaved_phase(benches: list[Bench], sizes: Sizes) -> dict[str, dict[str, float]]:
    """Round trips and single enqueues of all systems, alternating in small blocks.

    Every system's worker runs (idle while another system is measured), each on its own
    place; then no worker runs, for the enqueues. {metric: {system: value}}.
    """
    clients = {bench.name: bench.client for bench in benches}
    assert all(clients.values())
    workers = []
    try:
        for bench in benches:
            bench.place.purge(QUEUE)
            worker = measure.start_worker(bench.system, bench.place, QUEUE,
                                          bench.log_path("interleaved"))
            workers.append((bench, worker))
        for bench, worker in workers:
            measure.wait_ready(bench.system, bench.place, QUEUE, worker)
        trips = measure.interleaved_round_trips(
            clients, sizes.interleaved_round_trips, RT_BLOCK, sizes.warmup)  # type: ignore[arg-type]
    finally:
        for bench, worker in workers:
            stop_worker(bench, worker)
    enqueue = measure.interleaved_enqueue(clients, sizes.interleaved_enqueue,  # type: ignore[arg-type]
                                          ENQUEUE_BLOCK)
    for bench in benches:
        bench.place.purge(QUEUE)
    return {
        "rt_p50_ms": {name: t["rt_p50_ms"] for name, t in trips.items()},
        "rt_p99_ms": {name: t["rt_p99_ms"] for name, t in trips.items()},
        "enqueue_per_s": enqueue,
    }


def describe_round(figures: dict[str, Any]) -> str:
    bulk = figures["bulk_per_s"]
    return (
        f"start-up {figures['startup_s']:.2f}s, p50 {figures['rt_p50_ms']:.2f}ms, "
        f"p99 {figures['rt_p99_ms']:.2f}ms, {figures['throughput_per_s']:,.0f} tasks/s, "
        f"enqueue {figures['enqueue_per_s']:,.0f}/s, "
        f"bulk {'n/a' if bulk is None else f'{bulk:,.0f}/s'}; "
        f"other processes used {figures['others_cores']:.2f} cores"
    )


def run_all(
    benches: list[Bench], sizes: Sizes
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Rounds alternate the systems (A B C A B C ...) so drift shows in every system."""
    meter = CpuMeter(rabbitmq=any(bench.place.needs_rabbitmq for bench in benches))
    rounds = []
    for round_no in range(1, sizes.rounds + 1):
        for bench in benches:
            say(f"round {round_no}/{sizes.rounds} {bench.name} ...")
            start = meter.snapshot()
            phase = functools.partial(run_round, bench, sizes, round_no, meter)
            figures = repeat_if_broker_restarts(benches, bench, phase)
            figures["others_cores"] = meter.others_cores(start)
            figures["seconds"] = time.monotonic() - start.wall
            say(f"  {describe_round(figures)}")
            rounds.append(figures)
    memory = {}
    for bench in benches:
        say(f"memory {bench.name}: {sizes.memory_tasks:,} tasks ...")
        start = meter.snapshot()
        phase = functools.partial(memory_phase, bench, sizes)
        figures = repeat_if_broker_restarts(benches, bench, phase)
        figures["others_cores"] = meter.others_cores(start)
        figures["seconds"] = time.monotonic() - start.wall
        say(f"  RSS {figures['idle_rss_mb']:.1f} -> {figures['after_rss_mb']:.1f} MiB")
        memory[bench.name] = figures
    say("interleaved: round trips and enqueues, all systems alternating in blocks ...")
    start = meter.snapshot()
    interleaved: dict[str, Any] = interleaved_phase(benches, sizes)
    interleaved["others_cores"] = meter.others_cores(start)
    return rounds, memory, interleaved


# -- the run --------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    from importlib.metadata import version

    found = {"python": platform.python_version(), "sqlite": sqlite3.sqlite_version}
    for package in ("taskq", "celery", "kombu", "amqp", "huey"):
        try:
            found[package] = version(package)
        except Exception:
            found[package] = "?"
    return found


def git_revision() -> str:
    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=False)  # fmt: skip
        return proc.stdout.strip()

    dirty = "+dirty" if git("status", "--porcelain", "--untracked-files=no") else ""
    return (git("rev-parse", "--short", "HEAD") or "?") + dirty


def rabbitmq_version(benches: list[Bench]) -> str:
    on_rabbitmq = [bench.place for bench in benches if bench.place.needs_rabbitmq]
    return on_rabbitmq[0].server_version() if on_rabbitmq else "not used"  # type: ignore[attr-defined]


def meta(benches: list[Bench], sizes: Sizes, run_id: str, huey_poll: float) -> dict[str, Any]:
    systems = [bench.system for bench in benches]
    return {
        "run_id": run_id,
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "systems": [s.name for s in systems],
        "places": {bench.name: bench.place.describe() for bench in benches},
        "bulk_methods": {s.name: s.bulk_method for s in systems},
        "huey_poll_s": huey_poll if "huey" in [s.name for s in systems] else None,
        "slots": SLOTS,
        "sizes": dataclasses.asdict(sizes),
        "rabbitmq": rabbitmq_version(benches),
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "git": git_revision(),
        "versions": versions(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/run.py",
        description="taskq on its embedded broker and on RabbitMQ, vs a bare py-amqp floor, "
        "Celery and Huey, on this machine.",
    )
    parser.add_argument("--quick", action="store_true", help="a small smoke run (< 1 minute)")
    parser.add_argument("--rounds", type=int, help="rounds of the per-round metrics")
    parser.add_argument(
        "--systems", default=",".join(SYSTEMS), help="comma-separated, from: " + ", ".join(SYSTEMS)
    )
    parser.add_argument(
        "--huey-poll", type=float, default=HUEY_POLL, metavar="SECONDS",
        help=f"Huey's polling interval, consumer and result (default {HUEY_POLL})",
    )
    parser.add_argument(
        "--output", type=Path, default=RESULTS / "latest.json", help="where the JSON goes"
    )
    args = parser.parse_args(argv)
    unknown = set(args.systems.split(",")) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown system(s): {', '.join(sorted(unknown))}")
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.rounds:
        sizes = dataclasses.replace(sizes, rounds=args.rounds)
    known = make_systems(args.huey_poll)
    systems = [known[name] for name in args.systems.split(",")]
    run_id = uuid.uuid4().hex[:8]
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    benches: list[Bench] = []
    try:
        for system in systems:
            benches.append(Bench(system, system.place(f"bench-{system.name}-{run_id}")))
            open_bench(benches[-1])
        info = meta(benches, sizes, run_id, args.huey_poll)
        rounds, memory, interleaved = run_all(benches, sizes)
    except KeyboardInterrupt:
        say("interrupted: stopping workers, deleting vhosts and files")
        return 130
    finally:
        kill_all()
        for bench in benches:
            close_bench(bench)
    info["duration_s"] = time.monotonic() - started
    names = info["systems"]
    summary = report.summarize(rounds, memory, names)
    result = {"meta": info, "rounds": rounds, "memory": memory, "summary": summary,
              "ratios": report.ratios(summary), "interleaved": interleaved,
              "interleaved_ratios": report.ratios(
                  {k: v for k, v in interleaved.items() if isinstance(v, dict)})}  # fmt: skip
    result["targets"] = [dataclasses.asdict(target) for target in report.targets(result)]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    say("\n" + report.render(result) + f"\n\nJSON: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
