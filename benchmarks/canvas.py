"""Workflows: a chain of 10 steps and a chord of 1,000 header tasks, taskq against Celery.

    python benchmarks/run.py --only canvas [--quick] [--rounds N] [--systems ...]
    python benchmarks/canvas.py [same options]

In one run on this machine, the systems alternating round by round, 2 worker slots each:

* **taskq-embedded**: taskq on its embedded broker (a fresh SQLite file, ``places.TaskqFile``);
* **taskq**: taskq on the local RabbitMQ (a vhost of its own);
* **celery**: Celery 5.7 on the same RabbitMQ (a vhost of its own), taskq's contract as in
  ``celery_tasks.py`` (acks_late, prefetch 1, confirms, persistent, prefork -c 2), but with
  its **Redis** result backend: its ``rpc://`` backend has no chords. Its keys carry a prefix
  unique to the run (deleted at the end) in database ``--redis-db`` (default 11).

Each round, per system: start its worker, wait until it is up, warm up, then

1. **chain round trip**: ``add.s(0, 1) | add.s(1) | ... `` (10 steps, each sent by the worker
   that ran the one before) one chain at a time, from sending to the caller's ``get()`` of
   the last step's result (10); p50 / p99 over every chain of every round;
2. **chord end to end**: ``chord(add.s(i, i) for i in range(1000))(tsum.s())``, from the first
   send to the caller's ``get()`` of the callback's result; seconds and tasks per second
   (1,000 header tasks + the callback), the median of the rounds;

then stop the worker (warm shutdown, then the process group is killed). Ratios are
taskq ÷ celery (and taskq-embedded ÷ celery) of this run's figures: below 1 is better for
times, above 1 for tasks/s. Writes ``benchmarks/results/canvas.json``; worker logs go to
``benchmarks/results/logs/canvas-*.log``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import signal
import sqlite3
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # as a script, too

from benchmarks.broker import Vhost
from benchmarks.cpu import CpuMeter
from benchmarks.embedded import TaskqFile
from benchmarks.measure import percentile
from benchmarks.places import Place
from benchmarks.procs import WorkerProcess, kill_all

RESULTS = Path(__file__).resolve().parent / "results"
QUEUE = "bench"
SLOTS = 2
SYSTEMS = ("taskq-embedded", "taskq", "celery")
STARTUP_TIMEOUT = 90.0
#: Upper bounds on one chain's and one chord's result; a healthy run is far below them.
CHAIN_TIMEOUT = 60.0
CHORD_TIMEOUT = 300.0
#: How many times a system's round is repeated because RabbitMQ restarted under it.
BROKER_RESTARTS = 3


@dataclass(frozen=True)
class Sizes:
    rounds: int
    warmup_chains: int
    chains: int
    steps: int
    chord: int
    warmup_chord: int


FULL = Sizes(rounds=3, warmup_chains=5, chains=50, steps=10, chord=1000, warmup_chord=20)
QUICK = Sizes(rounds=1, warmup_chains=2, chains=10, steps=10, chord=200, warmup_chord=10)


def say(message: str) -> None:
    print(message, flush=True)


# -- the clients ----------------------------------------------------------------------------------


class TaskqCanvas:
    """taskq's canvas, on a client App with the worker's task names."""

    def __init__(self, url: str) -> None:
        from benchmarks.canvas_taskq import make_app

        self.app, self.add, self.tsum = make_app(url, QUEUE)
        self.timeout_errors: tuple[type[BaseException], ...] = (TimeoutError,)

    def chain(self, steps: int) -> Any:
        from taskq import chain

        return chain(self.add.s(0, 1), *[self.add.s(1) for _ in range(steps - 1)]).delay()

    def chord(self, size: int) -> Any:
        from taskq import chord

        return chord([self.add.s(i, i) for i in range(size)])(self.tsum.s())

    def close(self) -> None:
        self.app.close()


class CeleryCanvas:
    """Celery's canvas with its Redis result backend."""

    def __init__(self, url: str, backend: str, prefix: str) -> None:
        from celery.exceptions import TimeoutError as CeleryTimeout

        from benchmarks.canvas_celery import make_app

        self.app, self.add, self.tsum = make_app(url, backend, prefix, QUEUE)
        self.timeout_errors = (TimeoutError, CeleryTimeout)

    def chain(self, steps: int) -> Any:
        from celery import chain

        return chain(self.add.s(0, 1), *[self.add.s(1) for _ in range(steps - 1)]).apply_async()

    def chord(self, size: int) -> Any:
        from celery import chord

        return chord(self.add.s(i, i) for i in range(size))(self.tsum.s())

    def close(self) -> None:
        self.app.close()


class RedisKeys:
    """Celery's result keys for this run: one database, one key prefix, deleted at the end."""

    def __init__(self, url: str, prefix: str) -> None:
        import redis

        self.url, self.prefix = url, prefix
        self.client = redis.Redis.from_url(url, socket_timeout=10)

    def check(self) -> None:
        try:
            self.client.ping()
        except Exception as exc:
            raise SystemExit(f"Redis at {self.url} is not reachable ({exc}); the celery system "
                             "needs it (or leave celery out: --systems taskq-embedded,taskq)"
                             ) from None
        others = self.client.dbsize()
        if others:
            say(f"note: {self.url} already holds {others} keys; this run touches only keys "
                f"starting with {self.prefix!r}")

    def delete(self) -> int:
        deleted = 0
        with contextlib.suppress(Exception):
            batch = []
            for key in self.client.scan_iter(match=f"{self.prefix}*", count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    deleted += self.client.delete(*batch)
                    batch = []
            if batch:
                deleted += self.client.delete(*batch)
        with contextlib.suppress(Exception):
            self.client.close()
        return deleted


# -- the systems ----------------------------------------------------------------------------------


@dataclass
class Setup:
    """One system's place, worker command and client for the run."""

    name: str
    place: Place
    #: Consumers (RabbitMQ) or slot processes (embedded) that show the worker is up.
    ready_count: int
    argv: list[str]
    env: dict[str, str]
    make_client: Callable[[], Any]
    client: Any = None

    def connect(self) -> None:
        self.client = self.make_client()

    def disconnect(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()


def taskq_argv() -> list[str]:
    return [sys.executable, "-m", "taskq", "worker", "-A", "benchmarks.canvas_taskq:app",
            "-Q", QUEUE, "-c", str(SLOTS)]


def celery_argv() -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "benchmarks.canvas_celery:app", "worker",
            "-P", "prefork", "-c", str(SLOTS), "-Q", QUEUE, "-l", "WARNING",
            "--without-gossip", "--without-mingle", "--without-heartbeat"]


def make_setup(name: str, run_id: str, redis: RedisKeys | None) -> Setup:
    if name == "taskq-embedded":
        place: Any = TaskqFile(f"canvas-{name}-{run_id}")
        return Setup(name, place, SLOTS, taskq_argv(), {}, lambda: TaskqCanvas(place.url))
    place = Vhost(f"bench-canvas-{name}-{run_id}")
    if name == "taskq":
        return Setup(name, place, SLOTS, taskq_argv(), {}, lambda: TaskqCanvas(place.url))
    assert name == "celery" and redis is not None
    env = {"BENCH_BROKER_URL": place.url, "BENCH_RESULT_BACKEND": redis.url,
           "BENCH_REDIS_PREFIX": redis.prefix}
    # One consumer per Celery worker: prefetch = multiplier (1) x concurrency (2).
    return Setup(name, place, 1, celery_argv(), env,
                 lambda: CeleryCanvas(place.url, redis.url, redis.prefix))


# -- measuring ------------------------------------------------------------------------------------


def wait_result(setup: Setup, result: Any, timeout: float, worker: WorkerProcess) -> Any:
    """The result's value; checks every few seconds that the worker still lives."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return result.get(timeout=min(5.0, max(0.1, deadline - time.monotonic())))
        except setup.client.timeout_errors:
            worker.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{setup.name}: no result within {timeout:g}s") from None


def expect(value: Any, wanted: int, what: str) -> None:
    if value != wanted:
        raise AssertionError(f"{what} returned {value!r}, expected {wanted}")


def one_round(setup: Setup, sizes: Sizes, round_no: int) -> dict[str, Any]:
    """Start the worker, warm up, time the chains and the chord, stop the worker."""
    client, place = setup.client, setup.place
    with contextlib.suppress(sqlite3.OperationalError):  # a new embedded file has no tables yet
        place.purge(QUEUE)  # what a failed round left
    log = RESULTS / "logs" / f"canvas-{setup.name}-r{round_no}.log"
    env = {"TASKQ_BROKER_URL": place.url, **setup.env}
    worker = WorkerProcess(setup.argv, env, log)
    try:
        place.wait_ready(QUEUE, setup.ready_count, worker, STARTUP_TIMEOUT)
        for _ in range(sizes.warmup_chains):
            expect(wait_result(setup, client.chain(sizes.steps), CHAIN_TIMEOUT, worker),
                   sizes.steps, "a warm-up chain")
        warm = sizes.warmup_chord
        expect(wait_result(setup, client.chord(warm), CHORD_TIMEOUT, worker), warm * (warm - 1),
               "the warm-up chord")
        times = []
        for _ in range(sizes.chains):
            started = time.perf_counter()
            value = wait_result(setup, client.chain(sizes.steps), CHAIN_TIMEOUT, worker)
            times.append(time.perf_counter() - started)
            expect(value, sizes.steps, f"a chain of {sizes.steps}")
        n = sizes.chord
        started = time.perf_counter()
        value = wait_result(setup, client.chord(n), CHORD_TIMEOUT, worker)
        chord_s = time.perf_counter() - started
        expect(value, n * (n - 1), f"a chord of {n}")
    finally:
        worker.stop()
        place.wait_stopped(QUEUE)
    return {"chain_s": times, "chain_p50_ms": percentile(times, 50) * 1000,
            "chain_p99_ms": percentile(times, 99) * 1000, "chord_s": chord_s,
            "chord_tasks_per_s": (n + 1) / chord_s}


def round_repeating_if_broker_restarts(setup: Setup, sizes: Sizes, round_no: int
                                       ) -> dict[str, Any]:
    """A round whose broker restarted under it (another user of a shared machine running
    fault tests) is void: run it again on a fresh client."""
    for attempt in range(BROKER_RESTARTS + 1):
        try:
            figures = one_round(setup, sizes, round_no)
            if not setup.place.connection_lost():
                figures["broker_restarts"] = attempt
                return figures
        except Exception:
            if attempt == BROKER_RESTARTS or not setup.place.connection_lost():
                raise
        say(f"  the broker restarted under {setup.name}: waiting for it, then repeating")
        kill_all()
        setup.disconnect()
        setup.place.wait_reachable()
        setup.connect()
    raise RuntimeError(f"{setup.name}: the broker kept restarting")


def run(setups: list[Setup], sizes: Sizes) -> dict[str, list[dict[str, Any]]]:
    meter = CpuMeter(rabbitmq=any(s.place.needs_rabbitmq for s in setups))
    rounds: dict[str, list[dict[str, Any]]] = {s.name: [] for s in setups}
    for round_no in range(1, sizes.rounds + 1):
        order = setups[round_no - 1:] + setups[:round_no - 1]  # who goes first rotates
        for setup in order:
            say(f"round {round_no}/{sizes.rounds} {setup.name} ...")
            start = meter.snapshot()
            try:
                figures = round_repeating_if_broker_restarts(setup, sizes, round_no)
            except Exception as exc:
                say(f"  FAILED: {type(exc).__name__}: {exc}")
                rounds[setup.name].append({"error": f"{type(exc).__name__}: {exc}"})
                kill_all()
                setup.disconnect()
                setup.connect()
                continue
            figures["others_cores"] = meter.others_cores(start)
            rounds[setup.name].append(figures)
            say(f"  chain of {sizes.steps}: p50 {figures['chain_p50_ms']:.1f} ms, p99 "
                f"{figures['chain_p99_ms']:.1f} ms; chord of {sizes.chord:,}: "
                f"{figures['chord_s']:.2f} s ({figures['chord_tasks_per_s']:,.0f} tasks/s); "
                f"other processes used {figures['others_cores']:.2f} cores")
    return rounds


# -- the report -----------------------------------------------------------------------------------

METRICS = (  # key, label, unit, lower is better
    ("chain_p50_ms", "chain of {steps}: round trip p50", "ms", True),
    ("chain_p99_ms", "chain of {steps}: round trip p99", "ms", True),
    ("chord_s", "chord of {chord:,} + callback: end to end", "s", True),
    ("chord_tasks_per_s", "chord of {chord:,} + callback: tasks/s", "/s", False),
)


def summarize(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float | None]]:
    """Chains: p50/p99 over every chain of every round. Chord: the median of the rounds."""
    summary: dict[str, dict[str, float | None]] = {}
    for name, figures in rounds.items():
        good = [f for f in figures if "error" not in f]
        times = [t for f in good for t in f["chain_s"]]
        summary[name] = {
            "chain_p50_ms": percentile(times, 50) * 1000 if times else None,
            "chain_p99_ms": percentile(times, 99) * 1000 if times else None,
            "chord_s": statistics.median(f["chord_s"] for f in good) if good else None,
            "chord_tasks_per_s": (statistics.median(f["chord_tasks_per_s"] for f in good)
                                  if good else None),
            "failed_rounds": len(figures) - len(good),
        }
    return summary


def ratios(summary: dict[str, dict[str, float | None]]) -> dict[str, dict[str, float | None]]:
    """taskq ÷ celery and taskq-embedded ÷ celery, per metric."""
    out: dict[str, dict[str, float | None]] = {}
    if "celery" not in summary:
        return out
    for name in ("taskq", "taskq-embedded"):
        if name not in summary:
            continue
        pair = {}
        for key, *_ in METRICS:
            mine, theirs = summary[name][key], summary["celery"][key]
            pair[key] = mine / theirs if mine is not None and theirs else None
        out[f"{name}/celery"] = pair
    return out


def render(result: dict[str, Any]) -> str:
    summary, names = result["summary"], list(result["summary"])
    sizes = result["meta"]["sizes"]
    label_width = 44
    lines = [f"{'':{label_width}}" + "".join(f"{n:>16}" for n in names)
             + "".join(f"{r:>22}" for r in result["ratios"])]

    def cell(value: float | None, unit: str, width: int) -> str:
        if value is None:
            return f"{'failed':>{width}}"
        text = f"{value:,.0f}" if unit == "/s" else f"{value:,.2f}" if unit == "s" else \
            f"{value:,.1f}"
        return f"{text + ' ' + unit.lstrip('/') if unit != '/s' else text:>{width}}"

    for key, label, unit, lower in METRICS:
        row = f"{label.format(**sizes) + (' ↓' if lower else ' ↑'):{label_width}}"
        row += "".join(cell(summary[n][key], unit, 16) for n in names)
        for pair in result["ratios"].values():
            value = pair[key]
            row += f"{'n/a' if value is None else f'{value:.2f}':>22}"
        lines.append(row)
    noise = max((f.get("others_cores", 0.0) for fs in result["rounds"].values() for f in fs),
                default=0.0)
    lines.append(f"({sizes['rounds']} round(s), {sizes['chains']} chains each, {SLOTS} slots per "
                 f"system; ↓ lower is better, ↑ higher; ratios below 1 mean taskq is faster in "
                 f"time rows, above 1 in the tasks/s row)")
    if noise > 0.15:
        lines.append(f"warning: other processes used up to {noise:.2f} cores in some round: "
                     "those figures are noisy")
    failed = {n: s["failed_rounds"] for n, s in summary.items() if s["failed_rounds"]}
    if failed:
        lines.append(f"FAILED rounds (see the log above): {failed}")
    return "\n".join(lines)


# -- the run ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/run.py --only canvas",
        description="A chain of 10 steps and a chord of 1,000 header tasks: taskq on its "
        "embedded broker and on RabbitMQ, Celery on RabbitMQ with Redis results.")
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--rounds", type=int, help="rounds (default 3; --quick: 1)")
    parser.add_argument("--chains", type=int, help="timed chains per round (default 50)")
    parser.add_argument("--chord", type=int, help="header tasks of the chord (default 1000)")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help="comma-separated, from: " + ", ".join(SYSTEMS))
    parser.add_argument("--redis-db", type=int, default=11,
                        help="database of redis://localhost:6379 for Celery's results "
                        "(keys carry a prefix unique to the run; default 11)")
    parser.add_argument("--output", type=Path, default=RESULTS / "canvas.json")
    args = parser.parse_args(argv)
    unknown = set(args.systems.split(",")) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown system(s): {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    from benchmarks.suite import _interrupt, git_revision, versions

    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    overrides = {"rounds": args.rounds, "chains": args.chains, "chord": args.chord}
    sizes = dataclasses.replace(sizes, **{k: v for k, v in overrides.items() if v})
    names = [n for n in SYSTEMS if n in args.systems.split(",")]
    run_id = uuid.uuid4().hex[:8]
    redis = None
    if "celery" in names:
        redis = RedisKeys(f"redis://localhost:6379/{args.redis_db}", f"bench-canvas-{run_id}-")
        redis.check()
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    setups: list[Setup] = []
    try:
        for name in names:
            setups.append(make_setup(name, run_id, redis))
            setups[-1].place.create()
            setups[-1].connect()
        meta = {
            "run_id": run_id,
            "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "systems": names, "slots": SLOTS, "sizes": dataclasses.asdict(sizes),
            "places": {s.name: s.place.describe() for s in setups},
            "celery_results": redis.url if redis else None,
            "cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg(),
            "git": git_revision(), "versions": versions(),
        }
        rounds = run(setups, sizes)
    except KeyboardInterrupt:
        say("interrupted: stopping workers, deleting vhosts, files and Redis keys")
        return 130
    finally:
        kill_all()
        for setup in setups:
            setup.disconnect()
            setup.place.delete()
        if redis is not None:
            redis.delete()
    meta["duration_s"] = time.monotonic() - started
    summary = summarize(rounds)
    for figures in rounds.values():  # the raw times stay in the JSON, rounded
        for f in figures:
            if "chain_s" in f:
                f["chain_s"] = [round(t, 6) for t in f["chain_s"]]
    result = {"meta": meta, "rounds": rounds, "summary": summary, "ratios": ratios(summary)}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    say("\n" + render(result) + f"\n\nJSON: {args.output}")
    return 1 if any(s["failed_rounds"] for s in summary.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
