"""Celery's monitoring tools see taskq workers: ``celery inspect``, Flower, Flower's dashboard.

A ``taskq worker -E -n <node>`` publishes Celery's events on ``celeryev`` and answers Celery's
pidbox remote control. Here the tools nobody here wrote look at one: the ``celery`` CLI (with
a three-line Celery app that knows only the broker URL), a real Flower process (its HTTP API),
and Flower's dashboard rendered by headless Chromium (a screenshot and the rendered DOM).

One worker and one Flower serve the module (they cost seconds to start); each test looks at
what it needs. Chromium is optional here and required in CI (``apt-get install chromium``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from taskq import App

from .apps import basic
from .support import Broker, WorkerProcess, unique, wait_for

pytestmark = [pytest.mark.timeout(120), pytest.mark.rabbitmq]

CELERY = str(Path(sys.executable).with_name("celery"))
#: Every task name of tests.apps.basic (what ``-A tests.apps.basic:app`` serves).
BASIC_TASKS = {f"tests.apps.basic.{name}" for name in vars(basic.tasks) if name != "app"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL it if still there after 10 s; always reap."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


# -- the monitored worker -------------------------------------------------------------------------


@dataclass
class Monitored:
    """A ``taskq worker -E -n <node>`` and a client App sending to its queue."""

    worker: WorkerProcess
    node: str
    queue: str
    tasks: SimpleNamespace


@pytest.fixture(scope="module")
def monitored(rabbit_session: Broker, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Monitored]:
    home = tmp_path_factory.mktemp("monitored")
    # "known@host", made unique so that no other test's worker on this vhost shares its pidbox
    node = f"{unique('known')}@host"
    queue = unique("flower")
    worker = WorkerProcess(rabbit_session, "tests.apps.basic:app", [queue], home / "worker.log",
                           "-E", "-n", node, concurrency=2,
                           env={"TASKQ_STATE_DIR": str(home / "state")})
    app = App(rabbit_session.url, default_queue=queue)
    try:
        worker.wait_ready()
        yield Monitored(worker, node, queue, basic.build(app))
    finally:
        app.close()
        worker.stop()


# -- celery inspect -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def celery_inspect(rabbit_session: Broker, monitored: Monitored,
                   tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``celery -A probe inspect <what> --json -d <node>``, parsed: {node: reply}.

    ``probe`` is a Celery app module that knows nothing but the broker URL (in tmp, on
    PYTHONPATH), as an operator's own Celery project would be.
    """
    home = tmp_path_factory.mktemp("celery-probe")
    (home / "probe.py").write_text(
        "from celery import Celery\n\n"
        f"app = Celery('probe', broker={rabbit_session.url!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(home), *filter(None, [os.environ.get("PYTHONPATH")])])}

    def inspect(what: str) -> dict[str, Any]:
        # -d: the reply from that node ends the wait (the 10 s timeout is only a bound)
        proc = subprocess.run(
            [CELERY, "-A", "probe", "inspect", what, "--json", "-t", "10", "-d", monitored.node],
            cwd=home, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, (
            f"celery inspect {what} exited {proc.returncode}\nstdout: {proc.stdout}\n"
            f"stderr: {proc.stderr}\nworker log:\n{monitored.worker.log()}")
        replies: dict[str, Any] = json.loads(proc.stdout)
        return replies

    return inspect


def test_celery_inspect_ping_gets_a_pong_from_the_taskq_worker(
        monitored: Monitored, celery_inspect: Any) -> None:
    assert celery_inspect("ping") == {monitored.node: {"ok": "pong"}}


def test_celery_inspect_registered_lists_the_taskq_apps_tasks(
        monitored: Monitored, celery_inspect: Any) -> None:
    replies = celery_inspect("registered")
    assert list(replies) == [monitored.node]
    registered = replies[monitored.node]
    assert set(registered) >= BASIC_TASKS, BASIC_TASKS - set(registered)
    assert registered == sorted(registered)


def test_celery_inspect_stats_shows_the_workers_pid_and_pool(
        monitored: Monitored, celery_inspect: Any) -> None:
    stats = celery_inspect("stats")[monitored.node]
    assert stats["pid"] == monitored.worker.pid
    assert stats["pool"]["max-concurrency"] == 2
    assert len(stats["pool"]["processes"]) == 2
    assert monitored.worker.pid not in stats["pool"]["processes"]
    assert stats["broker"]["transport"] == "amqp"
    assert "guest:guest" not in json.dumps(stats)  # the password is masked


def test_celery_inspect_active_shows_a_running_task(
        monitored: Monitored, celery_inspect: Any, tmp_path: Path) -> None:
    # given a task that holds its slot until released
    pid_file, release = tmp_path / "pid", tmp_path / "release"
    result = monitored.tasks.pid_then_block.delay(str(pid_file), str(release))
    try:
        wait_for(pid_file.exists, 20, "the blocking task to start")
        slot_pid = int(pid_file.read_text())

        # when celery inspect asks what runs, then it is listed with its args and slot
        def running() -> list[dict[str, Any]]:
            return [task for task in celery_inspect("active")[monitored.node]
                    if task["id"] == result.id]

        [task] = wait_for(running, 20, "celery inspect active to list the running task",
                          interval=0.2)
        assert task["name"] == "tests.apps.basic.pid_then_block"
        # Celery's inspect active (safe=False) gives them decoded, as the task receives them
        assert (task["args"], task["kwargs"]) == ([str(pid_file), str(release)], {})
        assert task["hostname"] == monitored.node
        assert task["worker_pid"] == slot_pid
        assert task["delivery_info"]["routing_key"] == monitored.queue
        assert isinstance(task["time_start"], float)
    finally:
        release.touch()
    assert result.get(timeout=20) == "released"
    assert not any(task["id"] == result.id for task in celery_inspect("active")[monitored.node])


# -- Flower ---------------------------------------------------------------------------------------


@dataclass
class Flower:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path
    last_error: str = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str) -> Any:
        """GET a JSON page of Flower's API; None while it does not answer 200 (why: in
        ``last_error``)."""
        if self.proc.poll() is not None:
            raise AssertionError(f"flower exited with {self.proc.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            self.last_error = f"GET {path}: {exc.code} {exc.read()[:500]!r}"
        except (ConnectionError, urllib.error.URLError) as exc:
            self.last_error = f"GET {path}: {exc}"
        return None

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        """wait_for, with what Flower last said and its log when it times out."""
        try:
            return wait_for(predicate, timeout, what, interval=0.2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nlast error: {self.last_error}\n"
                                 f"flower log:\n{self.log()[-5000:]}") from None


@pytest.fixture(scope="module")
def flower(rabbit_session: Broker, monitored: Monitored,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flower]:
    """``celery --broker=<url> flower`` (no Celery app at all), once it lists the worker."""
    home = tmp_path_factory.mktemp("flower")
    port = free_port()
    log_path = home / "flower.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [CELERY, f"--broker={rabbit_session.url}", "flower", f"--port={port}",
             "--address=127.0.0.1"],
            cwd=home, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            # Flower 2's API answers 401 without auth unless this says it may
            env={**os.environ, "FLOWER_UNAUTHENTICATED_API": "true"},
        )
    server = Flower(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        # ?status=1 answers from Flower's event state: the worker's heartbeats reached it
        server.wait(lambda: (server.get("/api/workers?status=1") or {}).get(monitored.node), 30,
                    "Flower to count the worker alive from its events")
        yield server
    finally:
        stop_group(proc)


@pytest.fixture(scope="module")
def sent(monitored: Monitored, flower: Flower) -> SimpleNamespace:
    """Two tasks that succeed and one that fails, all finished (their results are back);
    sent once Flower watches the events."""
    tasks = monitored.tasks
    ok = [tasks.add.delay(2, 3), tasks.add.delay(40, 2)]
    bad = tasks.fail.delay("ValueError", "flower sees this")
    assert [r.get(timeout=20) for r in ok] == [5, 42]
    with pytest.raises(ValueError, match="flower sees this"):
        bad.get(timeout=20)
    return SimpleNamespace(ok=ok, bad=bad)


def test_flower_lists_the_taskq_worker(monitored: Monitored, flower: Flower) -> None:
    def inspected() -> dict[str, Any] | None:
        info = (flower.get("/api/workers?refresh=1") or {}).get(monitored.node) or {}
        return info if {"stats", "registered", "active_queues"} <= set(info) else None

    info = flower.wait(inspected, 20, "Flower's /api/workers to show the worker's stats, "
                       "registered tasks and queues")
    assert info["stats"]["pid"] == monitored.worker.pid
    assert set(info["registered"]) >= BASIC_TASKS
    assert [q["name"] for q in info["active_queues"]] == [monitored.queue]
    assert flower.get("/api/workers?status=1")[monitored.node] is True


def test_flower_shows_succeeded_and_failed_tasks(
        monitored: Monitored, flower: Flower, sent: SimpleNamespace) -> None:
    ids = {r.id for r in [*sent.ok, sent.bad]}

    def finished() -> dict[str, Any] | None:
        listed = flower.get("/api/tasks") or {}
        seen = {i: listed[i] for i in ids if i in listed}
        done = all(t["state"] in ("SUCCESS", "FAILURE") for t in seen.values())
        return seen if len(seen) == len(ids) and done else None

    seen = flower.wait(finished, 20, "Flower's /api/tasks to show the three tasks finished")
    for result, args, value in zip(sent.ok, ["[2, 3]", "[40, 2]"], ["5", "42"], strict=True):
        task = seen[result.id]
        assert task["state"] == "SUCCESS", task
        assert task["name"] == "tests.apps.basic.add"
        assert task["args"] == args
        assert task["kwargs"] == "{}"
        assert task["result"] == value
        assert task["worker"] == monitored.node
        assert task["routing_key"] == monitored.queue
        assert isinstance(task["runtime"], float) and task["runtime"] >= 0, task
        assert task["received"] <= task["started"] <= task["succeeded"], task
    failure = seen[sent.bad.id]
    assert failure["state"] == "FAILURE", failure
    assert failure["name"] == "tests.apps.basic.fail"
    assert failure["args"] == "['ValueError', 'flower sees this']"
    assert failure["exception"] == "ValueError('flower sees this')"
    assert "ValueError: flower sees this" in failure["traceback"]
    assert failure["worker"] == monitored.node
    # and one task's own page says the same
    assert flower.get(f"/api/task/info/{sent.bad.id}")["state"] == "FAILURE"


def test_flower_shows_a_running_task(monitored: Monitored, flower: Flower,
                                     tmp_path: Path) -> None:
    # given a task that holds its slot until released
    pid_file, release = tmp_path / "pid", tmp_path / "release"
    result = monitored.tasks.pid_then_block.delay(str(pid_file), str(release))
    try:
        wait_for(pid_file.exists, 20, "the blocking task to start")

        # when Flower inspects the one worker (active with safe=True: args as their repr)
        def running() -> list[dict[str, Any]]:
            path = f"/api/workers?refresh=1&workername={monitored.node}"
            info = (flower.get(path) or {}).get(monitored.node) or {}
            return [task for task in info.get("active") or [] if task["id"] == result.id]

        [task] = flower.wait(running, 20, "Flower to list the running task")
        assert task["name"] == "tests.apps.basic.pid_then_block"
        assert task["args"] == repr([str(pid_file), str(release)])
        assert task["worker_pid"] == int(pid_file.read_text())
        # and its events say STARTED
        assert flower.get(f"/api/task/info/{result.id}")["state"] == "STARTED"
    finally:
        release.touch()
    assert result.get(timeout=20) == "released"


# -- Flower's dashboard in a browser --------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium_binary() -> str:
    """Chromium's path; skip without it (before starting anything), fail in CI (which must
    install it)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is not None:
        return path
    why = "no chromium on PATH (apt-get install chromium) to render Flower's dashboard"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why}: CI must run the dashboard test")
    pytest.skip(why)


def chromium(binary: str, profile: Path, *args: str) -> str:
    """Run headless Chromium (a profile of its own; JS runs for up to 5 s of virtual time);
    what it printed. Its whole process group is gone afterwards."""
    proc = subprocess.Popen(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--hide-scrollbars", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
         "--window-size=1280,800", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert proc.returncode == 0, f"chromium {args} exited {proc.returncode}:\n{err}"
    return out


def test_flower_dashboard_renders_the_worker_and_its_tasks(
        chromium_binary: str, monitored: Monitored, flower: Flower, sent: SimpleNamespace,
        tmp_path: Path) -> None:
    flower.wait(lambda: (flower.get(f"/api/task/info/{sent.bad.id}") or {}).get("state")
                == "FAILURE", 20, "Flower to know the failed task")
    profile = tmp_path / "chromium-profile"

    # the workers page: its table is filled in by JavaScript from Flower's API
    dom = chromium(chromium_binary, profile, "--dump-dom", f"{flower.url}/workers")
    rows = [row for row in re.findall(r"<tr\b.*?</tr>", dom, re.S) if monitored.node in row]
    assert any("Online" in row for row in rows), (rows, dom[-3000:])

    # the tasks page lists the failure
    dom = chromium(chromium_binary, profile, "--dump-dom", f"{flower.url}/tasks")
    rows = [row for row in re.findall(r"<tr\b.*?</tr>", dom, re.S) if sent.bad.id in row]
    assert any("FAILURE" in row for row in rows), (rows, dom[-3000:])

    # and a screenshot of the dashboard, for a human to look at
    png = tmp_path / "flower.png"
    chromium(chromium_binary, profile, f"--screenshot={png}", f"{flower.url}/workers")
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1280, 800)
    assert len(data) > 20_000, f"{png} is {len(data)} bytes: a blank page?"
