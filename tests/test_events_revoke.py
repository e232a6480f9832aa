"""Celery's event stream and task revocation, seen from outside: real workers, real brokers.

A listener (``app.control.events`` in a thread, or a ``taskq events`` subprocess) is shown to
be live before anything is sent to it: the test publishes probe events until it hears one.
Then each test counts what it sees: events per task id and type, executions (lines a task
appended to a file), results per caller, and messages left in the queue and its dead letters.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import taskq
from taskq import App

from .support import ROOT, Broker, WorkerProcess, lines, run_taskq, unique, wait_for

PROBE = "taskq-test-probe"
STANDARD = ("type", "hostname", "timestamp", "utcoffset", "pid", "clock")
HEARTBEAT_FIELDS = ("freq", "active", "processed", "loadavg", "sw_ident", "sw_ver", "sw_sys")


# -- listening --------------------------------------------------------------------------------


def _probe_until(app: App, heard: Callable[[str], bool], what: str, timeout: float = 20) -> None:
    """Publish probe events (each with a token of its own) until ``heard(token)``: then the
    listener is live, and hears whatever is published from now on."""
    with app.control.link() as link:
        deadline = time.monotonic() + timeout
        while True:
            token = unique("probe")
            link.send_events([{"type": PROBE, "hostname": token, "timestamp": time.time()}])
            sent = time.monotonic()
            while time.monotonic() - sent < 0.5:
                if heard(token):
                    return
                time.sleep(0.02)
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what} to hear "
                                     "a probe event")


class Listener:
    """``app.control.events()`` run in a thread of its own: every event it got, in order."""

    def __init__(self, app: App, timeout: float = 90) -> None:
        self.app = app
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-events", daemon=True)

    def _run(self) -> None:
        try:
            for event in self.app.control.events(timeout=self.timeout):
                self.events.append(event)
                if self._stop.is_set():
                    return
        except BaseException as exc:  # shown by the test that waits on it
            self.error = exc

    def start(self) -> Listener:
        self._thread.start()
        _probe_until(self.app, lambda token: any(e.get("hostname") == token
                                                 for e in self.seen()), "the listener")
        return self

    def seen(self) -> list[dict[str, Any]]:
        if self.error is not None:
            raise AssertionError(f"the event listener failed: {self.error!r}")
        return list(self.events)

    def of(self, node: str, kind: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.seen() if e.get("hostname") == node
                and (kind is None or e.get("type") == kind)]

    def wait(self, node: str, kind: str, what: str, n: int = 1,
             timeout: float = 20) -> list[dict[str, Any]]:
        try:
            found: list[dict[str, Any]] = wait_for(
                lambda: len(self.of(node, kind)) >= n and self.of(node, kind), timeout, what)
            return found
        except AssertionError as exc:
            heard = [(e.get("type"), e.get("uuid")) for e in self.of(node)]
            raise AssertionError(f"{exc}; heard from {node}: {heard}") from None

    def stop(self) -> None:
        self._stop.set()
        with self.app.control.link() as link:  # an event, so that the loop looks at _stop
            link.send_events([{"type": PROBE, "hostname": "stop", "timestamp": time.time()}])
        self._thread.join(10)


@pytest.fixture
def listen(make_app: Callable[..., App]) -> Iterator[Callable[[], Listener]]:
    """Start live event listeners; each is stopped after the test."""
    started: list[Listener] = []

    def start() -> Listener:
        listener = Listener(make_app())
        started.append(listener)
        return listener.start()

    yield start
    for listener in started:
        listener.stop()


class EventsCli:
    """A ``taskq events`` subprocess; the lines it printed, as they come."""

    def __init__(self, broker: Broker, *args: str) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "taskq", "events", "--timeout", "90", *args], cwd=ROOT,
            env={**os.environ, "TASKQ_BROKER_URL": broker.url, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def printed(self) -> list[str]:
        if self.proc.poll() is not None and not self._reader.is_alive():
            raise AssertionError(f"taskq events exited with {self.proc.returncode}:\n"
                                 + "\n".join(self.lines))
        return list(self.lines)

    def interrupt(self) -> int:
        """Ctrl-C; its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError("taskq events did not stop on Ctrl-C") from None
        self._reader.join(5)
        return code


@pytest.fixture
def events_cli(broker: Broker, make_app: Callable[..., App]) -> Iterator[Callable[..., EventsCli]]:
    """Start live ``taskq events`` subprocesses; each is stopped after the test."""
    started: list[EventsCli] = []
    app = make_app()

    def start(*args: str) -> EventsCli:
        cli = EventsCli(broker, *args)
        started.append(cli)
        _probe_until(app, lambda token: any(token in line for line in cli.printed()),
                     f"taskq events {' '.join(args)}", timeout=30)
        return cli

    yield start
    for cli in started:
        if cli.proc.poll() is None:
            cli.proc.kill()
            cli.proc.wait(5)


def _node(name: str) -> str:
    return f"{unique(name)}@tests"


# -- helpers for revocations --------------------------------------------------------------------


def _pid(path: Path) -> int:
    wait_for(lambda: path.exists() and path.read_text().strip(), 15, f"a pid in {path.name}")
    return int(path.read_text())


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _revoked_letters(broker: Broker, queue: str, n: int) -> list[Any]:
    """Wait for ``n`` dead letters, then take them (each must say it was revoked)."""
    wait_for(lambda: broker.dead_letter_count(queue) >= n, 20, f"{n} dead letter(s)")
    letters = broker.take_dead_letters(queue)
    assert [(letter.exception, letter.reason) for letter in letters] == \
        [("TaskRevoked", "revoked")] * n, letters
    return letters


def _queue_settled(broker: Broker, queue: str) -> None:
    """Nothing ready, nothing held unacknowledged (within a deadline: an ack may trail)."""
    def settled() -> bool:
        info = broker.queue_info(queue)
        return (info["messages_ready"], info["messages_unacknowledged"]) == ("0", "0")
    wait_for(settled, 15, f"{queue} to hold nothing ready or unacked", interval=0.2)


# -- events ------------------------------------------------------------------------------------


def test_a_worker_with_events_on_tells_each_step_of_each_task_once(
        tasks: SimpleNamespace, listen: Callable[[], Listener],
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given a live listener, when a worker started with ``-E -n NODE`` comes up, runs 5
    tasks that succeed and 1 that fails, and is stopped with SIGTERM, then the listener hears
    the worker come online, beat and go offline, and each task received, started and
    succeeded (or failed, with its exception and traceback) exactly once, every event with
    Celery's standard fields and the worker's node name."""
    listener = listen()
    node = _node("events")
    worker = start_worker("-E", "-n", node, concurrency=2)
    [online] = listener.wait(node, "worker-online", "worker-online")
    ok = [tasks.add.delay(i, 10) for i in range(5)]
    bad = tasks.fail.delay("ValueError", "boom-for-events")
    assert [r.get(timeout=20) for r in ok] == [i + 10 for i in range(5)]
    with pytest.raises(ValueError, match="boom-for-events"):
        bad.get(timeout=20)
    listener.wait(node, "task-succeeded", "5 task-succeeded events", n=5)
    listener.wait(node, "task-failed", "the task-failed event")
    assert worker.stop() == 0
    listener.wait(node, "worker-offline", "worker-offline after SIGTERM")

    events = listener.of(node)
    for event in events:
        assert all(field in event for field in STANDARD), event
        assert isinstance(event["timestamp"], float) and abs(event["timestamp"] - time.time()) < 120
        assert isinstance(event["utcoffset"], int) and isinstance(event["clock"], int)
        assert isinstance(event["pid"], int)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "worker-online" and kinds[-1] == "worker-offline", kinds
    assert kinds.count("worker-online") == kinds.count("worker-offline") == 1
    clocks = [e["clock"] for e in events]
    assert clocks == sorted(clocks) and len(set(clocks)) == len(clocks), clocks

    for beat in [online, *listener.of(node, "worker-heartbeat"), events[-1]]:
        assert all(field in beat for field in HEARTBEAT_FIELDS), beat
        assert beat["freq"] == 2.0 and beat["sw_ident"] == "taskq"
        assert beat["sw_ver"] == taskq.__version__ and beat["sw_sys"] == os.uname().sysname
        assert len(beat["loadavg"]) == 3 and isinstance(beat["active"], int)
        assert beat["pid"] == worker.pid
    assert listener.of(node, "worker-heartbeat"), "no worker-heartbeat"
    assert events[-1]["processed"] == 6 and events[-1]["active"] == 0

    task_events = [e for e in events if e["type"].startswith("task-")]
    by_task: dict[str, list[str]] = {}
    for event in task_events:
        by_task.setdefault(event["uuid"], []).append(event["type"])
    steps = ["task-received", "task-started"]
    assert by_task == {**{r.id: [*steps, "task-succeeded"] for r in ok},
                       bad.id: [*steps, "task-failed"]}

    def one(task_id: str, kind: str) -> dict[str, Any]:
        [event] = [e for e in task_events if e["uuid"] == task_id and e["type"] == kind]
        return event

    for i, r in enumerate(ok):
        received = one(r.id, "task-received")
        assert received["name"] == "tests.apps.basic.add"
        assert received["args"] == repr([i, 10]) and received["kwargs"] == "{}"
        assert received["retries"] == 0 and received["eta"] is None
        assert received["parent_id"] is None
        started = one(r.id, "task-started")
        assert started["pid"] != worker.pid  # the slot process that ran it
        succeeded = one(r.id, "task-succeeded")
        assert succeeded["result"] == repr(i + 10)
        assert isinstance(succeeded["runtime"], float) and 0 <= succeeded["runtime"] < 10
        assert received["clock"] < started["clock"] < succeeded["clock"]
    failed = one(bad.id, "task-failed")
    assert "ValueError" in failed["exception"] and "boom-for-events" in failed["exception"]
    assert isinstance(failed["traceback"], str)
    assert "ValueError: boom-for-events" in failed["traceback"], failed["traceback"]
    # Celery's task-received says a root task's root_id is its own id (taskq's message
    # leaves the header out then: its default).
    assert [one(r.id, "task-received")["root_id"] for r in ok] == [r.id for r in ok]


def test_a_burst_of_short_tasks_is_told_in_full(
        tasks: SimpleNamespace, listen: Callable[[], Listener],
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given a live listener and a worker with ``-E`` on 2 slots, when 40 quick tasks run,
    then every one of them is told (received, started, succeeded) and the worker's last
    word (worker-offline) counts 40 processed: no step is lost on the way from a slot to the
    worker's monitor, however fast the tasks come."""
    listener = listen()
    node = _node("burst")
    worker = start_worker("-E", "-n", node, concurrency=2)
    results = [tasks.add.delay(i, 1) for i in range(40)]
    assert [r.get(timeout=30) for r in results] == [i + 1 for i in range(40)]
    assert worker.stop() == 0
    [offline] = listener.wait(node, "worker-offline", "worker-offline after SIGTERM")
    told: dict[str, list[str]] = {}
    for event in listener.of(node):
        if "uuid" in event:
            told.setdefault(event["uuid"], []).append(event["type"])
    steps = ["task-received", "task-started", "task-succeeded"]
    lost = {r.id: told.get(r.id, []) for r in results if told.get(r.id) != steps}
    assert not lost, f"{len(lost)} of 40 tasks not told in full: {lost}"
    assert offline["processed"] == 40


def test_taskq_events_prints_one_line_per_event_and_dump_prints_json(
        tasks: SimpleNamespace, broker: Broker, events_cli: Callable[..., EventsCli],
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given ``taskq events`` and ``taskq events --dump`` running, when a worker with ``-E``
    starts, runs two tasks and stops, both print one line per event: the plain one a
    readable line (time, node, type, task name[id], result), the dump one a JSON object;
    Ctrl-C stops them cleanly, and ``--timeout`` by itself."""
    plain, dump = events_cli(), events_cli("--dump")
    node = _node("cli-events")
    worker = start_worker("-E", "-n", node, concurrency=1)
    results = [tasks.add.delay(1, 2), tasks.add.delay(3, 4)]
    assert [r.get(timeout=20) for r in results] == [3, 7]
    worker.stop()

    def offline(cli: EventsCli) -> bool:
        return any(node in line and "worker-offline" in line for line in cli.printed())

    wait_for(lambda: offline(plain) and offline(dump), 20, "both to print worker-offline")
    assert plain.interrupt() == 0 and dump.interrupt() == 0
    mine = [json.loads(line) for line in dump.lines if node in line]
    assert all(isinstance(event, dict) and event["hostname"] == node for event in mine)
    kinds = [event["type"] for event in mine]
    assert kinds[0] == "worker-online" and kinds[-1] == "worker-offline"
    assert sorted(k for k in kinds if k.startswith("task-")) == sorted(
        ["task-received", "task-started", "task-succeeded"] * 2)
    printed = [line for line in plain.lines if f" {node} " in line]
    assert [line.split()[2] for line in printed] == kinds  # one line per event, same order
    for r, value in zip(results, (3, 7), strict=True):
        [line] = [x for x in printed if "task-succeeded" in x and r.id in x]
        assert f"tests.apps.basic.add[{r.id}]" in line and f"result={value}" in line
        assert "runtime=" in line
    bounded = run_taskq("events", "--timeout", "0.5", env={"TASKQ_BROKER_URL": broker.url},
                        timeout=30)
    assert bounded.returncode == 0, bounded.stdout + bounded.stderr  # stops by itself


def test_events_can_be_switched_on_and_off_at_run_time(
        tasks: SimpleNamespace, listen: Callable[[], Listener],
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given a worker started without ``-E``, its tasks publish no events; the
    ``enable_events`` command switches them on (the worker says it is online), and
    ``disable_events`` off again."""
    listener = listen()
    node = _node("toggle")
    start_worker("-n", node, concurrency=1)
    quiet = tasks.add.delay(1, 1)
    assert quiet.get(timeout=20) == 2

    def command(method: str) -> dict[str, Any]:
        replies: dict[str, Any] = tasks.app.control.broadcast(method, destination=[node],
                                                              timeout=10)
        return replies

    assert command("enable_events") == {node: {"ok": "task events enabled"}}
    listener.wait(node, "worker-online", "worker-online after enable_events")
    # Events leave a worker in order: the first one from it, after a task ran, is the online.
    assert listener.of(node)[0]["type"] == "worker-online", listener.of(node)
    loud = tasks.add.delay(2, 2)
    assert loud.get(timeout=20) == 4
    listener.wait(node, "task-succeeded", "the task-succeeded event")

    assert command("disable_events") == {node: {"ok": "task events disabled"}}
    muted = tasks.add.delay(3, 3)
    assert muted.get(timeout=20) == 6
    assert command("enable_events") == {node: {"ok": "task events enabled"}}
    listener.wait(node, "worker-online", "worker-online after the second enable", n=2)
    last = tasks.add.delay(4, 4)
    assert last.get(timeout=20) == 8
    wait_for(lambda: any(e.get("uuid") == last.id for e in
                         listener.of(node, "task-succeeded")), 20, "the last task's success")

    def told(task_id: str) -> list[str]:
        return [e["type"] for e in listener.of(node) if e.get("uuid") == task_id]

    steps = ["task-received", "task-started", "task-succeeded"]
    assert (told(quiet.id), told(loud.id), told(last.id)) == ([], steps, steps)
    # It ran, and its caller had its result, between disable_events and enable_events.
    assert told(muted.id) == [], "a task run while events were off was told"


# -- revocations -------------------------------------------------------------------------------


def test_tasks_revoked_before_they_start_are_never_run(
        tasks: SimpleNamespace, broker: Broker, queue: str, tmp_path: Path,
        make_app: Callable[..., App], listen: Callable[[], Listener],
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given a running worker and four tasks due in 3 s, when three are revoked before they
    are due (by their own handle, by another App, by ``taskq revoke``), then the revoking
    handle's get() raises TaskRevoked at once, the other callers get TaskRevoked from the
    worker, none of the three runs, each is dead-lettered with reason 'revoked' and told
    once as task-revoked, the fourth runs once, and nothing is left in the queue."""
    listener = listen()
    node = _node("revoke")
    start_worker("-E", "-n", node, concurrency=2)
    effects = tmp_path / "effects"
    sent = time.monotonic()
    by_handle, by_app, by_cli, kept = (
        tasks.record.apply_async((str(effects), token), countdown=3)
        for token in ("by-handle", "by-app", "by-cli", "kept"))
    cli = run_taskq("revoke", by_cli.id, env={"TASKQ_BROKER_URL": broker.url})
    assert cli.returncode == 0 and "revoked 1 task(s)" in cli.stdout, cli.stdout + cli.stderr
    make_app().revoke(by_app.id)
    by_handle.revoke()
    assert time.monotonic() - sent < 2.5, "too slow: the tasks may have been due already"
    with pytest.raises(taskq.TaskRevoked):
        by_handle.get(timeout=1)  # at once: this handle knows

    assert kept.get(timeout=20) == "kept"
    for result in (by_app, by_cli):
        with pytest.raises(taskq.TaskRevoked, match="revoked"):
            result.get(timeout=20)
    letters = _revoked_letters(broker, queue, 3)
    assert sorted(letter.correlation_id for letter in letters) == sorted(
        r.id for r in (by_handle, by_app, by_cli))
    _queue_settled(broker, queue)
    assert lines(effects) == ["kept"]
    listener.wait(node, "task-succeeded", "the kept task's task-succeeded")
    for result in (by_handle, by_app, by_cli):
        [event] = [e for e in listener.of(node) if e.get("uuid") == result.id]
        assert event["type"] == "task-revoked" and event["terminated"] is False, event
        assert event["expired"] is False and "signum" in event


def test_a_revocation_is_kept_for_a_worker_that_starts_later(
        tasks: SimpleNamespace, broker: Broker, queue: str, tmp_path: Path,
        make_app: Callable[..., App], start_worker: Callable[..., WorkerProcess]) -> None:
    """Given two tasks queued while no worker runs, when one is revoked (by another App)
    and only then a worker starts, the worker refuses it (dead-lettered, its caller gets
    TaskRevoked), lists it as revoked, and runs the other once."""
    effects = tmp_path / "effects"
    refused = tasks.record.delay(str(effects), "refused")
    runs = tasks.record.delay(str(effects), "runs")
    make_app().revoke(refused.id)
    node = _node("later")
    start_worker("-n", node, concurrency=1)
    assert runs.get(timeout=20) == "runs"
    revoked = tasks.app.control.inspect("revoked", destination=[node], timeout=10)
    assert refused.id in revoked[node]  # loaded from the broker when it started
    with pytest.raises(taskq.TaskRevoked, match="revoked"):
        refused.get(timeout=20)
    [letter] = _revoked_letters(broker, queue, 1)
    assert letter.correlation_id == refused.id
    _queue_settled(broker, queue)
    assert lines(effects) == ["runs"]


def test_revoke_with_terminate_stops_a_running_task_and_the_worker_goes_on(
        tasks: SimpleNamespace, broker: Broker, queue: str, tmp_path: Path,
        make_app: Callable[..., App], listen: Callable[[], Listener],
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given a task blocked in a slot process, when another App revokes it with terminate,
    the slot process is killed, its caller gets TaskRevoked, the message is dead-lettered
    (reason 'revoked') and never runs again, and the worker still runs two tasks at once;
    the event stream tells the task received, started, then revoked (terminated) once."""
    listener = listen()
    node = _node("terminate")
    worker = start_worker("-E", "-n", node, concurrency=2)
    pid_file, release = tmp_path / "pid", tmp_path / "release"
    blocked = tasks.pid_then_block.delay(str(pid_file), str(release))
    running = _pid(pid_file)
    pid_file.unlink()
    make_app().revoke(blocked.id, terminate=True)
    wait_for(lambda: not _alive(running), 15, f"the task's slot process {running} to die")
    with pytest.raises(taskq.TaskRevoked, match="revoked"):
        blocked.get(timeout=20)
    [letter] = _revoked_letters(broker, queue, 1)
    assert letter.correlation_id == blocked.id
    both = [tasks.rendezvous.delay(str(tmp_path), name, ["a", "b"]) for name in ("a", "b")]
    pids = {r.get(timeout=30) for r in both}
    assert len(pids) == 2 and running not in pids
    _queue_settled(broker, queue)
    release.touch()  # were it run again, it would write its pid again
    assert tasks.add.delay(1, 1).get(timeout=15) == 2
    assert not pid_file.exists()
    assert worker.proc.poll() is None
    listener.wait(node, "task-revoked", "the task-revoked event")
    told = [(e["type"], e.get("terminated"), e.get("signum"))
            for e in listener.of(node) if e.get("uuid") == blocked.id]
    assert told == [("task-received", None, None), ("task-started", None, None),
                    ("task-revoked", True, "SIGKILL")]


@pytest.mark.rabbitmq
def test_workers_starting_at_once_each_read_every_stored_revocation(
        broker: Broker, make_app: Callable[..., Any]) -> None:
    """Given 1,500 revocations stored in RabbitMQ, when three links read them at the same
    moment (workers started together), then each gets all of them (a reader takes them
    without acking: readers that overlapped used to get a part each)."""
    app = make_app()
    ids = [f"stored-{uuid.uuid4()}" for _ in range(1500)]
    app.control.revoke(ids)
    links = [app.control.link() for _ in range(3)]
    got: list[set[str]] = [set() for _ in links]
    start = threading.Barrier(len(links))

    def read(i: int) -> None:
        start.wait(10)
        got[i] = set(links[i].revoked())

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(links))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        for link in links:
            link.close()
    assert [len(set(ids) - seen) for seen in got] == [0, 0, 0]
    assert broker.counts("taskq.revoked")[1] == 0  # nothing left taken
