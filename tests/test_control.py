"""Seeing and steering workers: ``app.control``, ``taskq inspect``, ``taskq status``, metrics.

Workers answer Celery's remote-control commands (ping, stats, active, registered, ...) and act
on some (add_consumer, cancel_consumer, shutdown); ``taskq status`` puts the broker's queue
counts beside the workers' replies; ``--metrics-port`` serves Prometheus metrics. Everything
here talks to real ``taskq worker`` processes through the broker under test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from .support import ROOT, Broker, WorkerProcess, run_taskq, unique, wait_for

#: How long a broadcast collects replies: generous, a loaded machine answers late.
ANSWER = 3.0
BASIC = "tests.apps.basic"


def nodename(prefix: str) -> str:
    return f"{unique(prefix)}@test"


def taskq(broker: Broker, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the ``taskq`` CLI against the broker under test."""
    return run_taskq(*args, env={"TASKQ_BROKER_URL": broker.url})


def answer(tasks: SimpleNamespace, node: str, method: str, **arguments: Any) -> Any:
    """What ``node`` replies to ``method`` (it must reply)."""
    replies = tasks.app.control.broadcast(method, arguments, destination=[node],
                                          timeout=ANSWER)
    assert node in replies, f"{node} did not answer {method}: {replies}"
    return replies[node]


def totals(tasks: SimpleNamespace, node: str) -> dict[str, int]:
    return dict(answer(tasks, node, "stats")["total"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- ping ------------------------------------------------------------------------------------


def test_ping_gets_an_answer_from_each_named_worker_and_destination_narrows_it(
        tasks: SimpleNamespace, broker: Broker, queue: str,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given two workers started with -n, ping (API and CLI) gets a pong from both; with a
    destination (-d) only the named one answers, and naming no live worker is exit 1."""
    alpha, beta = nodename("alpha"), nodename("beta")
    start_worker("-n", alpha, concurrency=1)
    start_worker("-n", beta, concurrency=1, ready=False)
    wait_for(lambda: broker.counts(queue)[1] == 2, 30, "both workers to consume")

    assert tasks.app.control.ping(timeout=ANSWER, limit=2) == {
        alpha: {"ok": "pong"}, beta: {"ok": "pong"}}
    # limit=2 makes it wait the whole timeout: beta had all that time to (wrongly) answer
    assert tasks.app.control.ping(destination=[alpha], limit=2, timeout=1.5) == {
        alpha: {"ok": "pong"}}

    one = taskq(broker, "inspect", "ping", "-d", alpha, "-t", str(ANSWER))
    assert one.returncode == 0, one.stderr
    assert one.stdout.splitlines() == [f"{alpha}: pong"]

    both = taskq(broker, "inspect", "ping", "-d", alpha, "-d", beta, "-t", str(ANSWER), "--json")
    assert both.returncode == 0, both.stderr
    assert json.loads(both.stdout) == {alpha: {"ok": "pong"}, beta: {"ok": "pong"}}

    nobody = taskq(broker, "inspect", "ping", "-d", "nobody@nowhere", "-t", "0.5")
    assert nobody.returncode == 1
    assert nobody.stdout == "" and nobody.stderr.strip() == "no worker answered within 0.5s"


# -- inspect ---------------------------------------------------------------------------------


def test_inspect_shows_what_a_worker_runs_knows_and_has_done(
        tasks: SimpleNamespace, broker: Broker, queue: str, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given a worker (-c 2) that ran 3 adds and 1 failing task: stats counts the runs and
    knows the worker's pid and pool, registered lists the app's tasks, active_queues its
    queue, revoked a revocation, and conf hides the broker password; given then a blocked
    task, active names it (id, name, node, start) and reserved and scheduled are empty."""
    node = nodename("inspected")
    worker = start_worker("-n", node, concurrency=2)
    assert [tasks.add.delay(i, i).get(timeout=15) for i in range(3)] == [0, 2, 4]
    with pytest.raises(ValueError, match="boom"):
        tasks.fail.delay("ValueError", "boom").get(timeout=15)

    expected = {f"{BASIC}.add": 3, f"{BASIC}.fail": 1}
    wait_for(lambda: totals(tasks, node) == expected, 15, f"stats totals of {expected}")
    stats = answer(tasks, node, "stats")
    assert stats["pid"] == worker.pid
    assert stats["pool"]["max-concurrency"] == 2
    slots = stats["pool"]["processes"]
    assert len(slots) == 2 and worker.pid not in slots
    assert stats["taskq"]["processed"] == 4
    assert stats["taskq"]["outcomes"] == {"succeeded": 3, "failed": 1}
    assert stats["taskq"]["queues"] == [queue]
    cli = taskq(broker, "inspect", "stats", "-d", node, "-t", str(ANSWER))
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.startswith(f"{node}: pid {worker.pid}, concurrency 2, processed 4, ")

    assert answer(tasks, node, "registered") == sorted(tasks.app.tasks)
    assert f"{BASIC}.wait_for_file" in tasks.app.tasks
    assert [q["name"] for q in answer(tasks, node, "active_queues")] == [queue]

    gone = str(uuid.uuid4())
    tasks.app.control.revoke(gone)
    wait_for(lambda: gone in answer(tasks, node, "revoked"), 15, "the revocation to be known")

    conf = answer(tasks, node, "conf")
    assert conf["serializer"] == "json" and conf["default_queue"] == "taskq"  # the worker's
    if broker.kind == "rabbitmq":
        assert conf["broker_url"] == broker.url.replace("guest:guest@", "guest:****@")
        assert "guest:guest" not in json.dumps(conf)
    else:
        assert conf["broker_url"] == broker.url
    cli = taskq(broker, "inspect", "conf", "-d", node, "-t", str(ANSWER), "--json")
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)[node]["broker_url"] == conf["broker_url"]
    assert "guest:guest" not in cli.stdout

    release = tmp_path / "release"
    blocked = tasks.wait_for_file.delay(str(release))
    try:
        # the failed task's slot may still be settling it: wait for exactly the blocked one
        active = wait_for(lambda: [t for t in answer(tasks, node, "active")
                                   if t["id"] == blocked.id], 15, "the blocked task to show")
        assert [t["id"] for t in answer(tasks, node, "active")] == [blocked.id]
        assert active[0]["name"] == f"{BASIC}.wait_for_file"
        assert active[0]["hostname"] == node and active[0]["worker_pid"] in slots
        assert time.time() - 30 < active[0]["time_start"] <= time.time()
        assert answer(tasks, node, "reserved") == [] and answer(tasks, node, "scheduled") == []
        cli = taskq(broker, "inspect", "active", "-d", node, "-t", str(ANSWER))
        assert cli.returncode == 0, cli.stderr
        head, task_line = cli.stdout.splitlines()
        assert head == f"{node}: 1 running"
        assert task_line.startswith(f"  {BASIC}.wait_for_file[{blocked.id}] args=")
    finally:
        release.touch()
    assert blocked.get(timeout=15) in slots  # it ran in a slot process


@pytest.mark.parametrize("events", [False, True], ids=["plain", "events"])
def test_active_shows_a_running_tasks_arguments(
        tasks: SimpleNamespace, tmp_path: Path, events: bool,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given a worker (with -E or without) running a blocked task, ``active`` shows the
    task's arguments: as a list, as a Celery worker's does (Celery's ``Request.info``); a
    worker that no one watches may give their repr instead, but never an empty list."""
    node = nodename("args")
    start_worker("-n", node, *(["-E"] if events else []), concurrency=1)
    pid_file, release = tmp_path / "pid", tmp_path / "release"
    blocked = tasks.pid_then_block.delay(str(pid_file), str(release))
    try:
        wait_for(pid_file.exists, 15, "the blocking task to start")
        active = wait_for(lambda: answer(tasks, node, "active"), 15, "an active task")
        assert [(t["id"], t["name"]) for t in active] == [(blocked.id, f"{BASIC}.pid_then_block")]
        args = [str(pid_file), str(release)]
        if events:
            assert (active[0]["args"], active[0]["kwargs"]) == (args, {})
        else:
            assert active[0]["args"] in (args, repr(args), repr(tuple(args)))
    finally:
        release.touch()
    assert blocked.get(timeout=15) == "released"


def test_stats_counts_what_a_slot_ran_before_its_current_long_task(
        tasks: SimpleNamespace, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given one slot that ran 3 adds and now runs a long task, stats counts the 3 adds
    within a few seconds: a long task does not hold back the count of the ones before it."""
    node = nodename("counted")
    start_worker("-n", node, concurrency=1)
    assert [tasks.add.delay(i, i).get(timeout=15) for i in range(3)] == [0, 2, 4]
    pid_file, release = tmp_path / "pid", tmp_path / "release"
    blocked = tasks.pid_then_block.delay(str(pid_file), str(release))
    try:
        wait_for(pid_file.exists, 15, "the blocking task to start")
        wait_for(lambda: totals(tasks, node).get(f"{BASIC}.add") == 3, 5,
                 "stats to count the 3 adds while the long task runs")
    finally:
        release.touch()
    assert blocked.get(timeout=15) == "released"


# -- steering --------------------------------------------------------------------------------


def test_add_and_cancel_consumer_then_shutdown(
        tasks: SimpleNamespace, broker: Broker, queue: str, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given a worker on one queue: add_consumer makes it serve a second queue (a task sent
    there completes); cancel_consumer stops that (a task sent there stays ready); shutdown
    lets the running task finish, answers its caller, and the worker exits 0."""
    node = nodename("steered")
    worker = start_worker("-n", node, concurrency=1)
    extra = f"{queue}-extra"

    assert answer(tasks, node, "add_consumer", queue=extra) == {"ok": f"add consumer {extra}"}
    wait_for(lambda: broker.counts(extra)[1] == 1, 15, f"a consumer on {extra}")
    assert tasks.add.apply_async((20, 1), queue=extra).get(timeout=15) == 21
    assert [q["name"] for q in answer(tasks, node, "active_queues")] == [queue, extra]
    assert "ok" in answer(tasks, node, "add_consumer", queue=extra)  # already: harmless

    assert answer(tasks, node, "cancel_consumer", queue=extra) == {
        "ok": f"no longer consuming from {extra}"}
    wait_for(lambda: broker.counts(extra)[1] == 0, 15, f"no consumer left on {extra}")
    assert [q["name"] for q in answer(tasks, node, "active_queues")] == [queue]
    stranded = tasks.add.apply_async((30, 1), queue=extra)
    assert tasks.add.delay(40, 1).get(timeout=15) == 41  # the worker serves, just not there
    assert broker.counts(extra) == (1, 0)
    assert "error" in answer(tasks, node, "cancel_consumer", queue=queue)  # its only queue

    pid_file, release = tmp_path / "pid", tmp_path / "release"
    running = tasks.pid_then_block.delay(str(pid_file), str(release))
    wait_for(pid_file.exists, 15, "the blocking task to start")
    assert "ok" in answer(tasks, node, "shutdown")
    assert worker.proc.poll() is None  # warm: it waits for the running task
    release.touch()
    assert running.get(timeout=15) == "released"
    assert worker.wait(20) == 0
    assert broker.counts(queue) == (0, 0)
    assert broker.counts(extra) == (1, 0)  # still there for whoever consumes it next
    assert stranded.state == "PENDING"


# -- taskq status ----------------------------------------------------------------------------


#: What AMQP alone tells (RabbitMQ's management plugin may be enabled: see the test of it).
AMQP_ONLY = ("-A", "tests.apps.amqp_only:app")


def status_json(broker: Broker, queue: str, *options: str) -> dict[str, Any]:
    proc = taskq(broker, "status", *AMQP_ONLY, "-Q", queue, "--json", *options)
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def row(report: dict[str, Any], kind: str, key: str, name: str) -> dict[str, Any]:
    found = [r for r in report[kind] if r[key] == name]
    assert len(found) == 1, f"no {kind} row for {name}: {report[kind]}"
    return dict(found[0])


def test_status_shows_queue_counts_and_the_workers_on_them(
        tasks: SimpleNamespace, broker: Broker, queue: str, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given 3 tasks sent with no worker, status shows 3 ready and no consumer; given then a
    worker that ran them, dead-lettered a bad message and runs a blocked task, status (table
    and JSON) shows the queue drained with one held, the dead letter, both consumers, and the
    worker: node name, pid, queue, concurrency, the running task, and what it processed."""
    sent = [tasks.add.delay(i, 10) for i in range(3)]
    report = status_json(broker, queue, "-t", "0.5")
    assert report["broker"] == tasks.app.broker.display_url
    mine = row(report, "queues", "queue", queue)
    assert (mine["ready"], mine["consumers"], mine["dead_letters"]) == (3, 0, 0)
    assert mine["unacked"] == (None if broker.kind == "rabbitmq" else 0)
    assert not [w for w in report["workers"] if queue in (w["queues"] or [])]

    node = nodename("status")
    worker = start_worker("-n", node, concurrency=2)
    assert [r.get(timeout=15) for r in sent] == [10, 11, 12]
    broker.publish_raw(queue, b"\xff not json", content_type="application/json",
                       correlation_id=str(uuid.uuid4()))
    wait_for(lambda: broker.dead_letter_count(queue) == 1, 15, "the bad message's dead letter")
    # counted before a slot gets busy (see the test above for counts during a long task)
    wait_for(lambda: totals(tasks, node).get(f"{BASIC}.add") == 3, 15, "3 adds counted")
    stats = answer(tasks, node, "stats")
    processed = stats["taskq"]["processed"]
    assert processed == sum(stats["total"].values()) >= 3  # (+1 if the bad message counts)
    pid_file, release = tmp_path / "pid", tmp_path / "release"
    blocked = tasks.pid_then_block.delay(str(pid_file), str(release))
    wait_for(pid_file.exists, 15, "the blocking task to start")

    # the table and the JSON, asked at once (each takes a couple of seconds)
    table_proc = subprocess.Popen(
        [sys.executable, "-m", "taskq", "status", *AMQP_ONLY, "-Q", queue, "-t", "1.5"],
        cwd=ROOT,
        env={**os.environ, "TASKQ_BROKER_URL": broker.url}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        report = status_json(broker, queue, "-t", "1.5")
        table, errors = table_proc.communicate(timeout=60)
    finally:
        table_proc.kill()
    release.touch()
    assert blocked.get(timeout=15) == "released"

    mine = row(report, "queues", "queue", queue)
    assert (mine["ready"], mine["dead_letters"]) == (0, 1)
    assert mine["unacked"] == (None if broker.kind == "rabbitmq" else 1)
    assert mine["consumers"] == 2  # a slot running a task still consumes (prefetch 1)
    me = row(report, "workers", "worker", node)
    assert me["pid"] == worker.pid and me["queues"] == [queue] and me["concurrency"] == 2
    assert [(t["name"], t["id"]) for t in me["running"]] == [
        (f"{BASIC}.pid_then_block", blocked.id)]
    assert me["processed"] == processed
    assert me["kind"] == "taskq"

    assert table_proc.returncode == 0, errors
    lines = table.splitlines()
    assert lines[0] == f"broker: {tasks.app.broker.display_url}"
    assert lines[2].split() == ["QUEUE", "READY", "UNACKED", "CONSUMERS", "DEAD", "IN/S", "OUT/S",
                                "OLDEST"]
    assert ["WORKER", "PID", "QUEUES", "CONCURRENCY", "RUNNING", "PROCESSED", "UPTIME"] in [
        line.split() for line in lines]
    queue_row = next(line.split() for line in lines if line.split()[:1] == [queue])
    unacked = "-" if broker.kind == "rabbitmq" else "1"
    assert queue_row[:5] == [queue, "0", unacked, str(mine["consumers"]), "1"]
    worker_row = next(line.split() for line in lines if line.split()[:1] == [node])
    assert worker_row[:6] == [node, str(worker.pid), queue, "2", "1", str(processed)]
    assert any(line.startswith(f"  {node}: {BASIC}.pid_then_block[{blocked.id}] running for ")
               for line in lines)


@pytest.mark.parametrize(("url", "said"), [
    ("amqp://guest:guest@127.0.0.1:1//", "could not reach the broker at "
                                         "amqp://guest:****@127.0.0.1:1//"),
    ("sqlite:////proc/taskq.db", "/proc is not writable"),
    ("sqlite:////proc/taskq-nowhere/taskq.db", "/proc/taskq-nowhere does not exist"),
], ids=["rabbitmq-away", "sqlite-unwritable", "sqlite-no-directory"])
@pytest.mark.parametrize("command", [("status",), ("inspect", "ping")],
                         ids=["status", "inspect"])
def test_a_broker_that_is_away_is_one_line_and_a_non_zero_exit(
        url: str, said: str, command: tuple[str, ...]) -> None:
    """Given a broker nobody can reach (nothing listens on the port; a file where none can
    be made), status and inspect exit non-zero with one short line saying why, no
    traceback, and no password."""
    started = time.monotonic()
    proc = run_taskq(*command, "--broker", url, timeout=60)
    assert proc.returncode != 0
    assert proc.stdout == ""
    error = proc.stderr.strip().splitlines()
    assert len(error) == 1, proc.stderr
    assert error[0].startswith("Error: ") and said in error[0] and len(error[0]) < 300, error
    assert "Traceback" not in proc.stderr and "guest:guest" not in proc.stderr
    assert time.monotonic() - started < 30


# -- metrics ---------------------------------------------------------------------------------


def test_metrics_count_runs_by_outcome_and_show_queue_depth(
        tasks: SimpleNamespace, queue: str, broker: Broker, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given a worker with --metrics-port that ran 3 succeeding and 1 failing task, its
    /metrics says so: taskq_tasks_total by outcome, the duration histogram's counts, nothing
    running, and the queue's ready messages; a message naming no known task is a dead letter
    of task "unknown"; a run whose slot was killed is counted lost."""
    parser = pytest.importorskip("prometheus_client.parser")
    port = free_port()
    start_worker("--metrics-port", str(port), "-n", nodename("metered"), concurrency=2)
    assert [tasks.add.delay(i, 1).get(timeout=15) for i in range(3)] == [1, 2, 3]
    with pytest.raises(ValueError):
        tasks.fail.delay("ValueError", "metered").get(timeout=15)

    def scrape() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
            text = page.read().decode()
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in parser.text_string_to_metric_families(text)
                for s in family.samples}

    def sample(name: str, **labels: str) -> float | None:
        return metrics.get((name, frozenset(labels.items())))

    add, fail = f"{BASIC}.add", f"{BASIC}.fail"
    expected = {
        ("taskq_tasks_total", add, "succeeded"): 3.0,
        ("taskq_tasks_total", fail, "failed"): 1.0,
    }

    def counted() -> bool:
        nonlocal metrics
        metrics = scrape()
        # the queue's depth is read every few seconds: wait for a reading with none ready
        return all(sample(name, task=task, queue=queue, outcome=outcome) == value
                   for (name, task, outcome), value in expected.items()) and \
            sample("taskq_queue_ready_messages", queue=queue) == 0.0

    metrics: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    wait_for(counted, 15, f"the metrics to count the runs: {expected}", interval=0.1)
    assert sample("taskq_tasks_total", task=add, queue=queue, outcome="succeeded") == 3.0
    assert sample("taskq_tasks_total", task=fail, queue=queue, outcome="failed") == 1.0
    assert sample("taskq_tasks_total", task=add, queue=queue, outcome="failed") is None
    assert sample("taskq_task_duration_seconds_count", task=add, queue=queue) == 3.0
    assert sample("taskq_task_duration_seconds_count", task=fail, queue=queue) == 1.0
    assert sample("taskq_task_duration_seconds_bucket", task=add, queue=queue, le="+Inf") == 3.0
    assert sample("taskq_tasks_running", queue=queue) == 0.0
    assert sample("taskq_queue_ready_messages", queue=queue) == 0.0

    # a message naming a task nobody has: one series for all such names, the reason its type
    bogus_id = str(uuid.uuid4())
    broker.publish_raw(queue, json.dumps([[], {}, {}]).encode(), content_type="application/json",
                       correlation_id=bogus_id, delivery_mode=2,
                       application_headers={"id": bogus_id, "task": "bogus.name"})
    wait_for(lambda: (metrics := scrape()) and metrics.get(
        ("taskq_dead_letters_total", frozenset({"task": "unknown", "queue": queue,
                                                "reason": "NotRegistered"}.items()))) == 1.0,
             15, "the dead letter counted under task 'unknown'", interval=0.1)

    # a slot killed mid-task: its run is counted lost (at the second depth check that finds
    # no slot running it), and the task's second run is the one running
    pid_file, release = tmp_path / "pid", tmp_path / "release"
    blocked = tasks.pid_then_block.delay(str(pid_file), str(release))
    wait_for(pid_file.exists, 15, "the blocking task to start")
    first = int(pid_file.read_text())
    pid_file.unlink()
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: pid_file.exists() and pid_file.read_text(), 30, "the task to run again")

    def lost() -> bool:
        nonlocal metrics
        metrics = scrape()
        return sample("taskq_tasks_total", task=f"{BASIC}.pid_then_block", queue=queue,
                      outcome="lost") == 1.0
    try:
        wait_for(lost, 30, "the killed run to be counted lost", interval=0.2)
        assert sample("taskq_tasks_running", queue=queue) == 1.0  # the second run
    finally:
        release.touch()
    assert blocked.get(timeout=15) == "released"


@pytest.fixture
def management(broker: Broker) -> str:
    """RabbitMQ's management plugin, enabled (it stays enabled: it changes nothing else)."""
    subprocess.run(["rabbitmq-plugins", "enable", "rabbitmq_management"], check=True,
                   capture_output=True, timeout=120)
    base = "http://127.0.0.1:15672"

    def answers() -> bool:
        request = urllib.request.Request(f"{base}/api/overview",
                                         headers={"Authorization": "Basic Z3Vlc3Q6Z3Vlc3Q="})
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    wait_for(answers, 60, "the management plugin to answer")
    return base


@pytest.mark.rabbitmq
def test_status_on_rabbitmq_asks_the_management_plugin_for_queues_and_unacked_counts(
        management: str, broker: Broker, queue: str, make_app: Callable[..., Any],
        tasks: SimpleNamespace, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given the management plugin enabled, a queue that neither the app nor a worker names
    (a task waits there) and a worker running a blocked task: ``taskq status --broker URL``
    lists the vhost's work queues, that one included, and the running task's queue with one
    unacked message; none of taskq's or Celery's own queues (dead letters, replies, pidbox,
    revocations) appear as work queues."""
    from .apps import basic

    other = f"{queue}-other"
    waiting = basic.build(make_app(default_queue=other)).add.delay(1, 1)
    node = nodename("mgmt")
    start_worker("-n", node, concurrency=1)
    pid_file, release = tmp_path / "pid", tmp_path / "release"
    blocked = tasks.pid_then_block.delay(str(pid_file), str(release))
    wait_for(pid_file.exists, 15, "the blocking task to start")
    tasks.app.revoke(str(uuid.uuid4()))  # makes taskq.revoked exist

    seen: dict[str, Any] = {}

    def shown() -> bool:
        proc = taskq(broker, "status", "--json", "-t", "0.5")
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        seen.update(report)
        rows = {r["queue"]: r for r in report["queues"]}
        return (rows.get(other, {}).get("ready") == 1
                and rows.get(queue, {}).get("unacked") == 1)

    try:
        # the plugin's figures lag by its stats interval (5 s by default)
        wait_for(shown, 40, f"status to show {other} and one unacked in {queue}: {seen}")
    finally:
        release.touch()
    assert blocked.get(timeout=15) == "released"
    names = [r["queue"] for r in seen["queues"]]
    assert not [n for n in names if n.endswith(".dlq") or n.startswith("taskq.")
                or "pidbox" in n], names
    assert not waiting.ready()  # no worker serves that queue: it still waits there


def _session_cpu(session: int) -> float:
    """CPU seconds (user + system) used so far by every process in ``session``."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session:  # field 6: session id
            total += int(fields[11]) + int(fields[12])  # fields 14, 15: utime, stime
    return total / ticks


@pytest.mark.parametrize("events", [False, True], ids=["plain", "events"])
def test_an_idle_worker_and_its_monitor_use_almost_no_cpu(
        events: bool, tasks: SimpleNamespace,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given an idle worker (its monitor serving remote control, with events on or off),
    its processes together use well under a tenth of a core: the monitor waits for
    commands, reports and its heartbeat instead of spinning. CPU is measured over 3 s (a rate
    needs a window), after a first task showed the worker up."""
    worker = start_worker("-n", nodename("idle"), *(["-E"] if events else []), concurrency=2)
    assert tasks.add.delay(1, 1).get(timeout=15) == 2
    before = _session_cpu(worker.pid)
    time.sleep(3.0)
    used = _session_cpu(worker.pid) - before
    assert used < 0.3, f"an idle worker used {used:.2f} s of CPU in 3 s"
