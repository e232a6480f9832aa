"""Chaos: real workers on a throwaway broker, SIGKILLs at random, then count what happened.

:func:`run_chaos` starts ``W`` real ``taskq worker`` processes (``-A tests.apps.chaos:app``,
each in its own process group, logging to a file, with a ``TASKQ_STATE_DIR`` of its own that
survives its restarts), sends ``T`` tasks with results from this process through the public
API while a chaos thread kills, every 2-4 s (seeded), one of:

* ``slot``: one process that runs tasks, of a random worker (:func:`slot_pids`);
* ``worker``: a whole worker (SIGKILL of its process group), restarted after a short pause
  with the same state directory;
* ``broker``: the RabbitMQ node (SIGKILL of its Erlang VM), booted again on the same data, so
  that it recovers the persistent messages, and marks every one of them ``redelivered``.

Then it stops the chaos, lets everything finish (bounded waits), collects every result, and
checks (:class:`ChaosReport`): no confirmed task that never ran, every caller holding its
correct result, how many times each task ran, what is left in the dead-letter queue and in
every other queue of the vhost, how many kills of each kind.

The pieces (:class:`ChaosWorker`, :class:`Client`, :func:`read_effects`, :func:`check`) are
also used on their own by the deterministic test in ``test_chaos.py``; the benchmark script
``benchmarks/chaos.py`` runs :func:`run_chaos` for longer.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import amqp

import taskq
from taskq import App

from .apps import chaos as chaos_app
from .rabbit_node import AmqpNode

ROOT = Path(__file__).resolve().parent.parent
APP_SPEC = "tests.apps.chaos:app"
KINDS = ("slot", "worker", "broker")
#: multiprocessing's helper processes: they never run tasks.
HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.semaphore_tracker")
FORKSERVER = "multiprocessing.forkserver"
_TASK_ID = re.compile(r"\[[0-9a-f-]{32,36}\]")

Log = Callable[[str], None]


# -- processes -----------------------------------------------------------------------------------


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, process group) of every process, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), int(fields[2]))
    return table


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def slot_pids(worker_pid: int) -> list[int]:
    """The processes of a worker that run its tasks: its slot processes.

    With the process pool the worker starts a multiprocessing *forkserver*, which forks the
    slots: they are the forkserver's children (and, being forks, have its command line and
    ``comm`` too, so only the tree tells them apart).  Without a forkserver (a fork or spawn
    start method), they are the worker's own children.  multiprocessing's resource tracker is
    never one; nor are deeper descendants (a slot's child for hard time limits).
    """
    children: dict[int, list[int]] = defaultdict(list)
    for pid, (ppid, pgrp) in _process_table().items():
        if pgrp == worker_pid:  # the worker leads its own session and process group
            children[ppid].append(pid)
    slots = []
    for child in children[worker_pid]:
        command = _cmdline(child)
        if FORKSERVER in command:
            slots.extend(children[child])
        elif command and not any(helper in command for helper in HELPERS):
            slots.append(child)
    return sorted(slots)


class ChaosWorker:
    """One logical worker: a ``taskq worker`` process, killed and started again as one.

    Its log file and its ``TASKQ_STATE_DIR`` are the same across restarts.
    """

    def __init__(self, index: int, url: str, queue: str, slots: int, work_dir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = f"worker-{index}"
        self.url, self.queue, self.slots = url, queue, slots
        self.state_dir = work_dir / f"{self.name}-state"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = work_dir / f"{self.name}.log"
        self.extra_env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        #: Exits nobody caused (a crash of the worker itself): "worker-1 exited with 1".
        self.unexpected_exits: list[str] = []

    def start(self) -> None:
        assert not self.alive(), f"{self.name} is running"
        self.starts += 1
        env = {**os.environ, "TASKQ_BROKER_URL": self.url, "PYTHONUNBUFFERED": "1",
               "TASKQ_STATE_DIR": str(self.state_dir), **self.extra_env}
        env.pop("TASKQ_APP", None)
        with open(self.log_path, "ab") as log:
            log.write(f"=== {self.name} start #{self.starts} at {time.strftime('%X')} ===\n"
                      .encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "taskq", "worker", "-A", APP_SPEC, "-Q", self.queue,
                 "-c", str(self.slots)],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def slot_pids(self) -> list[int]:
        return slot_pids(self.pid) if self.alive() else []

    def kill(self) -> None:
        """SIGKILL the whole worker: supervisor, forkserver, slots (one process group)."""
        assert self.proc is not None
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def check(self) -> bool:
        """False if it had exited by itself: then note that and start it again."""
        if self.proc is None or self.alive():
            return True
        self.unexpected_exits.append(f"{self.name} exited with {self.proc.returncode}")
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # slots outliving their supervisor
        self.start()
        return False

    def stop(self, timeout: float = 20) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL of the group whatever happened."""
        if self.proc is None:
            return
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def wait_consuming(node: AmqpNode, queue: str, consumers: int, timeout: float,
                   workers: Iterable[ChaosWorker] = ()) -> None:
    """Wait until the broker shows ``consumers`` consumers on ``queue`` (one per slot)."""
    deadline = time.monotonic() + timeout
    while True:
        for worker in workers:
            if worker.proc is not None and not worker.alive():
                raise AssertionError(f"{worker.name} exited with {worker.proc.returncode}:\n"
                                     f"{worker.log()[-3000:]}")
        counts = None
        with suppress(OSError, amqp.exceptions.AMQPError):
            counts = node.queue_counts(queue)
        if counts is not None and counts[1] >= consumers:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {consumers} consumers "
                                 f"on {queue} (now {counts})")
        time.sleep(0.1)


# -- the client ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What a caller ended up with: the value, or what went wrong instead."""

    value: Any = None
    error: str | None = None


class Client:
    """Sends ``record`` tasks through the public API and collects their results.

    Each logical task has a token.  A ``.delay()`` that raises was not confirmed: it is sent
    again (possibly making a second message for the token: executions are counted per token),
    and the confirmed copy's result is the one its caller waits for.
    """

    def __init__(self, url: str, queue: str, effects: Path, task_ms: float = 20.0,
                 publish_timeout: float = 60.0) -> None:
        self.app = App(url, default_queue=queue, publish_timeout=publish_timeout)
        self.tasks = chaos_app.build(self.app)
        self.effects = effects
        self.task_ms = task_ms
        self.sent: list[str] = []  # every logical task, in order
        self.results: dict[str, taskq.AsyncResult[str]] = {}  # the confirmed ones
        self.send_errors: Counter[str] = Counter()
        self.lock = threading.Lock()

    def send(self, token: str, deadline: float) -> bool:
        """Send one logical task until a send is confirmed or ``deadline`` (monotonic) passes."""
        with self.lock:
            self.sent.append(token)
        while True:
            try:
                result = self.tasks.record.delay(str(self.effects), token, self.task_ms)
            except (taskq.BrokerUnavailable, taskq.PublishError) as exc:
                with self.lock:
                    self.send_errors[type(exc).__name__] += 1
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.2)
                continue
            with self.lock:
                self.results[token] = result
            return True

    def warm_up(self, timeout: float = 30) -> None:
        """One round trip (not counted as a logical task): declares the work queue and this
        client's reply queue, so that they exist before the broker is first killed."""
        result = self.tasks.record.delay(str(self.effects), "warm-up", 0)
        assert result.get(timeout=timeout) == chaos_app.expected("warm-up")

    def collect(self, timeout: float, log: Log | None = None) -> dict[str, Outcome]:
        """Every confirmed task's outcome: ``get()`` again while the broker is away, until
        ``timeout`` seconds have passed in all."""
        deadline = time.monotonic() + timeout
        outcomes = {}
        unavailable = 0
        for token, result in list(self.results.items()):
            while True:
                remaining = deadline - time.monotonic()
                try:  # past the deadline, still take a result that has arrived
                    value = result.get(timeout=min(max(remaining, 0.01), 10.0))
                except taskq.BrokerUnavailable:  # "may still arrive: call get() again"
                    unavailable += 1
                    if remaining <= 0:
                        outcomes[token] = Outcome(error=f"no result within {timeout:g}s "
                                                        "(broker unavailable)")
                        break
                    time.sleep(0.5)
                except taskq.TimeoutError:
                    if remaining <= 0:
                        outcomes[token] = Outcome(error=f"no result within {timeout:g}s")
                        break
                except Exception as exc:
                    outcomes[token] = Outcome(error=f"{type(exc).__name__}: {exc}"[:300])
                    break
                else:
                    outcomes[token] = Outcome(value=value)
                    break
        if log and unavailable:
            log(f"get() raised BrokerUnavailable {unavailable} times (then called again)")
        return outcomes

    def close(self) -> None:
        self.app.close()


# -- what happened -------------------------------------------------------------------------------


@dataclass
class Effects:
    """Runs per token, from the lines ``record`` appended: started, and finished."""

    starts: Counter[str]
    ends: Counter[str]

    @property
    def total_ends(self) -> int:
        return sum(self.ends.values())


def read_effects(path: Path) -> Effects:
    starts: Counter[str] = Counter()
    ends: Counter[str] = Counter()
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3:
                (starts if parts[0] == "start" else ends)[parts[1]] += 1
    return Effects(starts, ends)


def dead_letters(node: AmqpNode, queue: str) -> list[tuple[str | None, str]]:
    """(token, reason) of each message in ``<queue>.dlq``, read without taking them off."""
    letters: list[tuple[str | None, str]] = []
    conn = node.connect()
    try:
        channel = conn.channel()
        channel.auto_decode = False
        while (message := channel.basic_get(f"{queue}.dlq", no_ack=False)) is not None:
            headers = message.properties.get("application_headers") or {}
            reason = headers.get("x-taskq-dead-reason", "?")
            reason = reason.decode() if isinstance(reason, bytes) else str(reason)
            reason = _TASK_ID.sub("[...]", reason)  # one line per reason, not per message
            token = None
            with suppress(ValueError, TypeError, IndexError, KeyError):
                token = json.loads(message.body)[0][1]  # Celery protocol v2: [args, kwargs, ..]
            letters.append((token, reason))
    except amqp.exceptions.NotFound:
        pass
    finally:
        with suppress(Exception):
            conn.close()  # unacked: back to the queue
    return letters


def queue_contents(node: AmqpNode) -> dict[str, int]:
    """Messages (ready + unacked) in every queue of the vhost, by rabbitmqctl."""
    return node.list_queues()


def wait_drained(node: AmqpNode, queue: str, timeout: float) -> dict[str, int]:
    """Wait (bounded) until no queue but the DLQ holds messages; the last listing."""
    deadline = time.monotonic() + timeout
    while True:
        queues = queue_contents(node)
        busy = {name: n for name, n in queues.items()
                if n and name != f"{queue}.dlq" and not name.startswith("taskq.lost.")}
        if not busy or time.monotonic() > deadline:
            return queues
        time.sleep(0.5)


@dataclass
class ChaosReport:
    seed: int | None
    settings: str
    tasks: int                       # logical tasks sent
    confirmed: int                   # ... of which a send was confirmed
    send_errors: dict[str, int]      # sends that raised (then sent again)
    unconfirmed: list[str]           # tokens never confirmed before the send deadline
    never_executed: list[str]        # confirmed, and no run ever started
    incorrect: dict[str, str]        # token -> what its caller got instead of its result
    incorrect_never_ran: list[str]   # ... of which never ran at all
    incorrect_never_finished: list[str]  # ... or ran, but every run was killed
    outcomes: dict[str, int]         # "correct" / exception type -> callers
    executions: dict[int, int]       # runs started -> how many tasks ran that often
    cut_short_runs: int              # runs that started and never finished (killed)
    dlq: int                         # messages in <queue>.dlq (passive declare)
    dlq_reasons: dict[str, int]
    dlq_tasks: int                   # distinct tasks among them
    dlq_never_ran: int               # ... of which never ran
    queues: dict[str, int]           # every queue of the vhost -> messages left
    kills: dict[str, int]
    broker_boots: list[float] = field(default_factory=list)
    unexpected_exits: list[str] = field(default_factory=list)
    harness_problems: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    queue: str = ""

    def left_in_queues(self) -> dict[str, int]:
        """Queues other than the DLQ still holding messages (a reply queue included).

        taskq's lost-run counts (``taskq.lost.*``) are bookkeeping, not messages: a whole
        worker's death is counted by the next worker started on its machine, which may come
        after another worker already ran the task; such a count expires unused."""
        return {name: n for name, n in self.queues.items()
                if n and name != f"{self.queue}.dlq" and not name.startswith("taskq.lost.")}

    def _queues_shown(self) -> dict[str, int]:
        return {k: v for k, v in self.queues.items() if not k.startswith("taskq.lost.")}

    def lost_run_counts(self) -> int:
        return sum(n for name, n in self.queues.items() if name.startswith("taskq.lost."))

    def problems(self) -> list[str]:
        found = list(self.harness_problems)
        if self.unconfirmed:
            found.append(f"{len(self.unconfirmed)} sends never confirmed: "
                         f"{_sample(self.unconfirmed)}")
        if self.never_executed:
            found.append(f"{len(self.never_executed)} confirmed tasks never executed: "
                         f"{_sample(self.never_executed)}")
        if self.incorrect:
            found.append(f"{len(self.incorrect)} callers without their correct result "
                         f"({len(self.incorrect_never_ran)} of those tasks never ran): "
                         f"{_sample([f'{t}: {_short(e)}' for t, e in self.incorrect.items()], 3)}")
        if self.dlq:
            found.append(f"{self.dlq} messages in the DLQ, for {self.dlq_tasks} tasks "
                         f"({self.dlq_never_ran} never ran): {dict(self.dlq_reasons)}")
        if left := self.left_in_queues():
            found.append(f"messages left in queues: {left}")
        found.extend(self.unexpected_exits)
        return found

    @property
    def ok(self) -> bool:
        return not self.problems()

    def format(self) -> str:
        runs = ", ".join(f"{n}x: {count}" for n, count in sorted(self.executions.items()))
        lines = [
            f"chaos report (seed {self.seed}; {self.settings})",
            f"  tasks {self.tasks}, confirmed {self.confirmed}, sends that raised "
            f"{sum(self.send_errors.values())} {dict(self.send_errors) or ''}".rstrip(),
            f"  kills: {dict(self.kills)}; broker boots: "
            + ", ".join(f"{s:.1f}s" for s in self.broker_boots),
            f"  runs per task (started): {runs}; runs cut short: {self.cut_short_runs}",
            f"  callers: {dict(self.outcomes)}",
            f"  never executed: {len(self.never_executed)}; incorrect: {len(self.incorrect)} "
            f"(never ran: {len(self.incorrect_never_ran)}, ran but every run was killed: "
            f"{len(self.incorrect_never_finished)})",
            f"  DLQ: {self.dlq} messages, {self.dlq_tasks} tasks (never ran: "
            f"{self.dlq_never_ran}) {dict(self.dlq_reasons)}",
            f"  queues: {self._queues_shown()}; "
            f"lost-run counts left to expire: {self.lost_run_counts()}",
            "  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items()),
        ]
        problems = self.problems()
        lines.append("  OK" if not problems else "  PROBLEMS:\n" +
                     "\n".join(f"    - {p}" for p in problems))
        return "\n".join(lines)


def _sample(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def _short(error: str) -> str:
    error = _TASK_ID.sub("[...]", error)
    return error if len(error) <= 110 else error[:107] + "..."


def check(*, node: AmqpNode, queue: str, client: Client, outcomes: dict[str, Outcome],
          effects: Effects, queues: dict[str, int], kills: dict[str, int],
          seed: int | None = None, settings: str = "", harness_problems: Iterable[str] = (),
          unexpected_exits: Iterable[str] = (), seconds: dict[str, float] | None = None,
          unconfirmed: Iterable[str] = ()) -> ChaosReport:
    """Compare what callers got and what ran with what was sent."""
    confirmed = list(client.results)
    never = [t for t in confirmed if effects.starts[t] == 0]
    incorrect = {}
    for token in confirmed:
        outcome = outcomes.get(token, Outcome(error="not collected"))
        if outcome.error is not None:
            incorrect[token] = outcome.error
        elif outcome.value != chaos_app.expected(token):
            incorrect[token] = f"wrong value {outcome.value!r}"
    verdicts: Counter[str] = Counter()
    for token in confirmed:
        error = incorrect.get(token)
        if error is None:
            verdicts["correct"] += 1
        else:
            verdicts["no result" if error.startswith("no result") else error.split(":")[0]] += 1
    letters = dead_letters(node, queue)
    dead_tokens = {token for token, _ in letters if token}
    counted = node.queue_counts(f"{queue}.dlq")
    return ChaosReport(
        seed=seed, settings=settings, queue=queue,
        tasks=len(client.sent), confirmed=len(confirmed),
        send_errors=dict(client.send_errors), unconfirmed=list(unconfirmed),
        never_executed=never, incorrect=incorrect,
        incorrect_never_ran=[t for t in incorrect if effects.starts[t] == 0],
        incorrect_never_finished=[t for t in incorrect
                                  if effects.starts[t] and not effects.ends[t]],
        outcomes=dict(verdicts),
        executions=dict(sorted(Counter(effects.starts[t] for t in client.sent).items())),
        cut_short_runs=sum(effects.starts.values()) - sum(effects.ends.values()),
        dlq=counted[0] if counted else 0,
        dlq_reasons=dict(Counter(reason for _, reason in letters)),
        dlq_tasks=len(dead_tokens),
        dlq_never_ran=sum(1 for token in dead_tokens if effects.starts[token] == 0),
        queues=queues, kills=dict(kills), broker_boots=list(node.boots[1:]),
        unexpected_exits=list(unexpected_exits), harness_problems=list(harness_problems),
        seconds=seconds or {},
    )


# -- the run -------------------------------------------------------------------------------------


@dataclass
class ChaosSettings:
    tasks: int = 300
    workers: int = 2
    slots: int = 2
    #: About how long the chaos lasts: kills are planned to fit in it (a broker kill counts
    #: its boot time).
    chaos_seconds: float = 30.0
    #: Pause between the end of one kill (and its restart) and the next kill.
    interval: tuple[float, float] = (2.0, 4.0)
    weights: dict[str, float] = field(
        default_factory=lambda: {"slot": 2.0, "worker": 1.0, "broker": 1.0})
    #: Kills of a kind the plan must contain, whatever the dice say.
    at_least: dict[str, int] = field(default_factory=dict)
    #: Tasks go out in this many bursts spread over ``send_seconds`` (default: the first
    #: three quarters of the chaos), so that the broker is killed with a backlog queued.
    bursts: int = 10
    send_seconds: float | None = None
    #: Each run sleeps 0..task_ms ms.  None: long enough that the tasks' pure work keeps the
    #: slots busy for ``load`` of the chaos: the broker is then killed with a backlog queued,
    #: which is what it takes to see the redelivered-after-a-crash defect.
    task_ms: float | None = 20.0
    load: float = 0.5
    worker_pause: tuple[float, float] = (0.2, 1.5)  # a killed worker is down this long
    publish_timeout: float = 60.0
    result_timeout: float = 120.0    # after the chaos, for every result to arrive
    drain_timeout: float = 15.0      # then for the queues to empty
    seed: int | None = None

    @property
    def max_task_ms(self) -> float:
        if self.task_ms is not None:
            return self.task_ms
        slot_seconds = self.load * self.chaos_seconds * self.workers * self.slots
        return round(2000 * slot_seconds / max(1, self.tasks), 1)  # mean = half of the max

    def describe(self) -> str:
        return (f"{self.tasks} tasks, {self.workers} workers x {self.slots} slots, "
                f"~{self.chaos_seconds:g}s of chaos, kills every {self.interval[0]:g}-"
                f"{self.interval[1]:g}s, {self.bursts} bursts, tasks 0-{self.max_task_ms:g} ms")


def plan_kills(settings: ChaosSettings, rng: random.Random, boot_seconds: float
               ) -> list[tuple[float, str]]:
    """(pause before, kind) for each kill: the required ones plus weighted random ones, as
    many as fit in ``chaos_seconds``.

    The required kills of a kind are spread over the plan (one in each of ``n`` equal
    stretches of it), so that, say, three broker kills do not all fall at its end by chance.
    """
    low, high = settings.interval
    # A node boots slower on a loaded machine than when the test booted it first.
    cost = {"slot": 0.0, "worker": sum(settings.worker_pause) / 2, "broker": 1.5 * boot_seconds}
    required = [kind for kind, n in settings.at_least.items() for _ in range(n)]
    budget = settings.chaos_seconds - sum((low + high) / 2 + cost[k] for k in required)
    names = [k for k in KINDS if settings.weights.get(k, 0) > 0]
    extra = []
    cheapest = min(((low + high) / 2 + cost[k] for k in names), default=0.0)
    while names and budget >= cheapest:
        kind = rng.choices(names, [settings.weights[k] for k in names])[0]
        step = (low + high) / 2 + cost[kind]
        if budget >= step:  # else draw again: a cheaper kind may still fit
            extra.append(kind)
            budget -= step
    total = len(required) + len(extra)
    kinds: list[str | None] = [None] * total
    free = list(range(total))
    for kind, n in sorted(settings.at_least.items(), key=lambda item: -item[1]):
        for j in range(n):
            stretch = [p for p in free if j * total / n <= p < (j + 1) * total / n] or free
            position = rng.choice(stretch)
            free.remove(position)
            kinds[position] = kind
    rng.shuffle(extra)
    for position, kind in zip(free, extra, strict=True):
        kinds[position] = kind
    return [(rng.uniform(low, high), kind) for kind in kinds if kind is not None]


class _Chaos:
    """The chaos thread's work: the plan, one kill at a time, each restart done before the
    next pause begins."""

    def __init__(self, node: AmqpNode, workers: list[ChaosWorker], plan: list[tuple[float, str]],
                 rng: random.Random, settings: ChaosSettings, log: Log, began: float) -> None:
        self.node, self.workers, self.plan, self.rng = node, workers, plan, rng
        self.settings, self.log, self.began = settings, log, began
        self.kills: Counter[str] = Counter()
        self.stop = threading.Event()
        self.done = 0

    def say(self, text: str) -> None:
        self.log(f"[{time.monotonic() - self.began:6.1f}s] {text}")

    def run(self) -> None:
        for pause, kind in self.plan:
            if self.stop.wait(pause):
                return
            for worker in self.workers:
                if not worker.check():
                    self.say(f"{worker.name} had exited by itself: started again")
            getattr(self, f"kill_{kind}")()
            self.done += 1

    def kill_slot(self) -> None:
        slots = {w: pids for w in self.workers if (pids := w.slot_pids())}
        if not slots:
            self.kills["slot-miss"] += 1
            self.say("kill slot: no slot process found")
            return
        worker = self.rng.choice(sorted(slots, key=lambda w: w.name))
        pid = self.rng.choice(slots[worker])
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self.kills["slot"] += 1
        self.say(f"SIGKILL slot process {pid} of {worker.name}")

    def kill_worker(self) -> None:
        worker = self.rng.choice(self.workers)
        worker.kill()
        self.kills["worker"] += 1
        pause = self.rng.uniform(*self.settings.worker_pause)
        self.say(f"SIGKILL {worker.name} (process group {worker.pid}); back in {pause:.1f}s")
        time.sleep(pause)
        worker.start()

    def kill_broker(self) -> None:
        pid = self.node.kill()
        self.kills["broker"] += 1
        self.say(f"SIGKILL broker (beam.smp {pid})")
        took = self.node.start()
        self.say(f"broker back after {took:.1f}s of boot")


def _thread(target: Callable[[], None], name: str, errors: list[BaseException]
            ) -> threading.Thread:
    def run() -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def _send_all(client: Client, settings: ChaosSettings, began: float, send_seconds: float,
              deadline: float, unconfirmed: list[str]) -> None:
    """Send the tasks in bursts spread over ``send_seconds``."""
    bursts = max(1, min(settings.bursts, settings.tasks))
    for i in range(settings.tasks):
        due = began + (i * bursts // settings.tasks) * send_seconds / bursts
        if (wait := due - time.monotonic()) > 0:
            time.sleep(wait)
        token = f"t{i:05d}"
        if not client.send(token, deadline):
            unconfirmed.append(token)


def _shortfalls(chaos: _Chaos, settings: ChaosSettings, sender: threading.Thread) -> list[str]:
    problems = []
    if sender.is_alive():
        problems.append("the sender did not finish in time")
    if chaos.done < len(chaos.plan):
        problems.append(f"only {chaos.done} of {len(chaos.plan)} planned kills happened")
    for kind, n in settings.at_least.items():
        if chaos.kills[kind] < n:
            problems.append(f"{chaos.kills[kind]} {kind} kills, wanted at least {n}")
    return problems


def run_chaos(node: AmqpNode, settings: ChaosSettings, work_dir: Path,
              log: Log = print) -> ChaosReport:
    """Run the whole thing against ``node``; the report (also printed through ``log``)."""
    seed = settings.seed if settings.seed is not None else random.SystemRandom().randrange(10**6)
    rng = random.Random(seed)
    plan = plan_kills(settings, rng, node.start_seconds)
    queue = f"chaos-{seed}-{os.urandom(3).hex()}"
    log(f"chaos seed {seed}: {settings.describe()}; queue {queue}")
    log("kill plan: " + ", ".join(f"{pause:.1f}s {kind}" for pause, kind in plan))
    work_dir.mkdir(parents=True, exist_ok=True)
    effects = work_dir / "effects.log"
    workers = [ChaosWorker(i, node.url, queue, settings.slots, work_dir)
               for i in range(1, settings.workers + 1)]
    client = Client(node.url, queue, effects, settings.max_task_ms, settings.publish_timeout)
    seconds: dict[str, float] = {}
    errors: list[BaseException] = []
    unconfirmed: list[str] = []
    try:
        for worker in workers:
            worker.start()
        wait_consuming(node, queue, settings.workers * settings.slots, 60, workers)
        client.warm_up()
        node.settle()  # the queues' declarations on disk before the first broker kill
        began = time.monotonic()
        chaos = _Chaos(node, workers, plan, rng, settings, log, began)
        send_seconds = settings.send_seconds
        if send_seconds is None:
            send_seconds = 0.75 * settings.chaos_seconds
        send_deadline = began + send_seconds + settings.publish_timeout + 30
        sender = _thread(lambda: _send_all(client, settings, began, send_seconds, send_deadline,
                                           unconfirmed), "chaos-sender", errors)
        killer = _thread(chaos.run, "chaos-killer", errors)
        sender.join(max(0.0, send_deadline - time.monotonic()) + 5)
        seconds["send"] = time.monotonic() - began
        killer.join(max(0.0, began + 2 * settings.chaos_seconds + 60 - time.monotonic()))
        if killer.is_alive():
            chaos.stop.set()
            killer.join(60)
        seconds["chaos"] = time.monotonic() - began
        if errors:
            raise errors[0]
        problems = _shortfalls(chaos, settings, sender)
        log(f"chaos over after {seconds['chaos']:.1f}s: {dict(chaos.kills)}; collecting")
        if not node.running():
            node.start()
        for worker in workers:
            worker.check()
        collecting = time.monotonic()
        outcomes = client.collect(settings.result_timeout, log)
        seconds["results"] = time.monotonic() - collecting
        queues = wait_drained(node, queue, settings.drain_timeout)
        report = check(
            node=node, queue=queue, client=client, outcomes=outcomes,
            effects=read_effects(effects), queues=queues, kills=chaos.kills, seed=seed,
            settings=settings.describe(), harness_problems=problems,
            unexpected_exits=[e for w in workers for e in w.unexpected_exits],
            seconds=seconds, unconfirmed=unconfirmed)
    finally:
        for worker in workers:
            worker.stop()
        client.close()
    log(report.format())
    return report
