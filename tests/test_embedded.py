"""The embedded broker's own promises: a file it can't use is one clear line, kill -9 of any
process loses nothing, many processes share one file, a long reader blocks nobody.

(The contract itself, on this broker and on RabbitMQ, is in the other test modules: every
test there that takes ``broker`` runs on both.)
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import taskq
from taskq import App
from taskq.broker.sqlite.store import filesystem_type
from taskq.broker.sqlite.wake import Waker, wake_dir

from .apps import basic
from .support import ROOT, SqliteBroker, WorkerProcess, lines, run_taskq, unique, wait_for

pytestmark = pytest.mark.embedded


def _one_line_error(url: str, tmp_path: Path) -> str:
    """What `taskq worker` prints when pointed at ``url``: exactly one line, no traceback."""
    result = run_taskq("worker", "-A", "tests.apps.basic:app", env={"TASKQ_BROKER_URL": url},
                       timeout=30, cwd=ROOT)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    return line


def test_a_file_in_a_directory_that_does_not_exist_is_one_line(tmp_path: Path) -> None:
    line = _one_line_error(f"sqlite:///{tmp_path}/no/such/dir/taskq.db", tmp_path)
    assert "does not exist" in line and str(tmp_path / "no/such/dir") in line


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a read-only filesystem needs root")
def test_a_file_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    """A read-only mount: permissions can't say no to root, the filesystem does."""
    target = tmp_path / "ro"
    target.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)],
                      capture_output=True).returncode != 0:
        pytest.skip("could not mount a read-only tmpfs here")
    try:
        line = _one_line_error(f"sqlite:///{target}/taskq.db", tmp_path)
    finally:
        subprocess.run(["umount", str(target)], check=False)
    assert "not writable" in line


def test_a_file_that_is_not_sqlite_or_not_taskqs_or_another_version_is_one_line(
        tmp_path: Path) -> None:
    text = tmp_path / "notes.db"
    text.write_text("these are my notes\n" * 100)
    assert "is not an SQLite database" in _one_line_error(f"sqlite:///{text}", tmp_path)
    assert text.read_text().startswith("these are my notes")  # not touched

    foreign = tmp_path / "app.db"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE users (name TEXT)")
    assert "not taskq's" in _one_line_error(f"sqlite:///{foreign}", tmp_path)

    other_version = tmp_path / "old.db"
    App(f"sqlite:///{other_version}").broker.store.connection()
    with sqlite3.connect(other_version) as db:
        db.execute("UPDATE meta SET value = '0' WHERE key = 'schema'")
    line = _one_line_error(f"sqlite:///{other_version}", tmp_path)
    assert "another version of taskq" in line and "schema 0" in line


def test_a_network_filesystem_is_recognised_from_the_mount_table() -> None:
    mountinfo = textwrap.dedent("""\
        22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
        40 22 0:35 / /srv/shared rw,relatime shared:20 - nfs4 fs:/export rw,vers=4.2
        41 40 0:36 / /srv/shared/local rw,relatime shared:21 - tmpfs tmpfs rw
        """)
    assert filesystem_type(Path("/srv/shared/jobs/taskq.db"), mountinfo) == "nfs4"
    assert filesystem_type(Path("/srv/shared/local/taskq.db"), mountinfo) == "tmpfs"
    assert filesystem_type(Path("/home/me/taskq.db"), mountinfo) == "ext4"
    assert filesystem_type(Path("/srv/sharedx/taskq.db"), mountinfo) == "ext4"


def test_a_url_that_names_no_file_or_a_host_is_refused() -> None:
    for url, expected in (("sqlite://", "names no file"), ("sqlite:///:memory:", "names no file"),
                          ("sqlite://host/x.db", "names a host"),
                          ("sqlite:///x.db?fsync=1", "unknown option")):
        with pytest.raises(taskq.ConfigurationError, match=expected):
            App(url).broker  # noqa: B018 - building it is what checks it


def test_the_default_is_the_embedded_broker_in_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TASKQ_BROKER_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    app = App()
    assert app.config.broker_url == "sqlite:///taskq.db"
    assert str(tmp_path / "taskq.db") in app.broker.location


CLIENT = """
import sys
from taskq import App
from tests.apps import basic
tasks = basic.build(App(sys.argv[1], default_queue=sys.argv[2]))
for i in range(int(sys.argv[3])):
    tasks.record.delay(sys.argv[4], f"{sys.argv[5]}{i}")
    print(i, flush=True)  # printed only once the send is committed
"""


def _client(broker: SqliteBroker, queue: str, count: int, effects: Path,
            prefix: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", CLIENT, broker.url, queue, str(count),
                             str(effects), prefix], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_client_killed_mid_send_loses_nothing_it_was_told_was_sent(
        broker: SqliteBroker, queue: str, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given a client sending tasks in a loop (each printed once .delay() returned), when it
    is killed (-9), every task it was told was sent runs, and its reply queue (it waited for
    results no more) is gone once a worker has noticed it died."""
    effects = tmp_path / "effects"
    client = _client(broker, queue, 100_000, effects, "k")
    assert client.stdout is not None
    confirmed = [client.stdout.readline() for _ in range(200)]
    os.kill(client.pid, signal.SIGKILL)
    client.wait(10)
    confirmed += client.stdout.read().splitlines()
    sent = {f"k{line.strip()}" for line in confirmed if line.strip()}
    assert len(sent) >= 200
    start_worker(concurrency=2)
    wait_for(lambda: sent <= set(lines(effects)), 30, "every confirmed task to run")
    db = sqlite3.connect(broker.path)
    owned = ("SELECT COUNT(*) FROM reply_queues r JOIN holders h ON h.id = r.holder "
             "WHERE h.pid = ?")
    wait_for(lambda: db.execute(owned, (client.pid,)).fetchone()[0] == 0, 10,
             "the dead client's reply queue to be deleted")


def test_many_processes_share_one_file_and_no_one_sees_database_is_locked(
        broker: SqliteBroker, queue: str, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given 6 client processes sending 300 tasks each while 2 workers x 2 slots run them, all
    on one file, every task runs exactly once and no process reports a locked database."""
    effects = tmp_path / "effects"
    workers = [start_worker(concurrency=2) for _ in range(2)]
    clients = [_client(broker, queue, 300, effects, f"c{n}-") for n in range(6)]
    outputs = [client.communicate(timeout=120) for client in clients]
    assert all(client.returncode == 0 for client in clients), [err for _, err in outputs]
    expected = {f"c{n}-{i}" for n in range(6) for i in range(300)}
    wait_for(lambda: len(lines(effects)) >= len(expected), 60, "every task to run")
    assert sorted(lines(effects)) == sorted(expected)  # once each
    everything = "".join(err for _, err in outputs) + "".join(w.log() for w in workers)
    assert "locked" not in everything, everything[-2000:]


def test_a_reader_holding_a_long_transaction_blocks_nobody(
        broker: SqliteBroker, make_app: Callable[..., App],
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given another process reading the file in a transaction it keeps open (a report, a
    backup), clients still send and workers still run and answer."""
    start_worker(concurrency=2)
    reader = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sqlite3, sys, time
        db = sqlite3.connect({str(broker.path)!r}, isolation_level=None)
        db.execute("BEGIN")
        db.execute("SELECT COUNT(*) FROM messages").fetchone()
        print("reading", flush=True)
        time.sleep(30)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout is not None and reader.stdout.readline().strip() == "reading"
        tasks = basic.build(make_app(publish_timeout=5))
        started = time.monotonic()
        assert [tasks.add.delay(i, i).get(timeout=10) for i in range(50)] == [
            2 * i for i in range(50)]
        assert time.monotonic() - started < 15
        assert reader.poll() is None  # it is still holding its transaction
    finally:
        reader.kill()
        reader.wait()


def _in_main_file(path: Path, queue: str) -> int:
    """Messages of ``queue`` in the database file itself, not counting the write-ahead log."""
    db = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    try:
        return int(db.execute("SELECT COUNT(*) FROM messages WHERE queue = ?",
                              (queue,)).fetchone()[0])
    except sqlite3.DatabaseError:
        return -1  # a page caught mid-copy: look again
    finally:
        db.close()


def test_a_running_worker_checkpoints_the_log_so_no_sender_pays_for_it(
        broker: SqliteBroker, make_app: Callable[..., App],
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given a worker running, what clients commit goes from the write-ahead log into the
    database file within about a second: the worker checkpoints in the background (and
    fsyncs then), so a sender's or a slot's commit never stops to do it."""
    start_worker(concurrency=1)
    tasks = basic.build(make_app())
    with tasks.app.batch():
        for i in range(20):
            tasks.add.apply_async((i, i), queue="nobody-consumes-this")
    assert _in_main_file(broker.path, "nobody-consumes-this") in (0, -1)  # all in the log
    wait_for(lambda: _in_main_file(broker.path, "nobody-consumes-this") == 20, 10,
             "the worker to checkpoint the 20 messages into the database file")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (pytest's tmp_path is already ~60 characters long)."""
    directory = Path(tempfile.mkdtemp(prefix="tq", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("length", range(20, 141, 4))
def test_a_wake_up_reaches_its_waiter_whatever_the_files_path_length(
        short_dir: Path, length: int) -> None:
    """Socket addresses are limited to 107 bytes: for a database at any path, a waiter's
    socket and the links to it fit (or live under the temporary directory), so a wake-up is
    delivered rather than dropped (which would leave a task waiting for the fallback look)."""
    from taskq.broker.sqlite.wake import Listener

    database = short_dir / ("d" * max(1, length - len(str(short_dir)) - 10)) / "taskq.db"
    database.parent.mkdir()
    folder = wake_dir(database)
    listener = Listener(folder, ["some queue"], f"s-{2**63:x}-{2**47:x}")  # longest names
    try:
        Waker(folder).wake(["some queue"])
        assert listener.clear(), f"no wake-up reached {listener.path} (database {database})"
    finally:
        listener.close()


QUICK_APP = """
from taskq import App
from tests.apps import basic
app = App(publish_timeout=1.0)
tasks = basic.build(app)
"""


def _quick_app(tmp_path: Path) -> dict[str, str]:
    """A worker app whose store gives up on a locked file after 1s (instead of 15s)."""
    (tmp_path / "quick_app.py").write_text(QUICK_APP)
    return {"PYTHONPATH": f"{tmp_path}:{ROOT}"}


def _messages(broker: SqliteBroker, queue: str) -> int:
    db = sqlite3.connect(str(broker.path), timeout=30)
    try:
        return int(db.execute("SELECT COUNT(*) FROM messages WHERE queue = ?",
                              (queue,)).fetchone()[0])
    finally:
        db.close()


def _within(predicate: Callable[[], object], timeout: float) -> bool:
    try:
        wait_for(predicate, timeout, "it")
    except AssertionError:
        return False
    return True


def test_a_settle_that_fails_gives_the_message_back_and_it_runs_once(
        broker: SqliteBroker, queue: str, tmp_path: Path, make_app: Callable[..., App],
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given a slot whose settle fails (the file stayed locked longer than publish_timeout),
    the slot drops its link and opens a new one: the message it held comes back (as on
    RabbitMQ when a connection closes) and is settled without running again, while the
    worker lives; a later clean restart finds nothing to run twice."""
    worker = start_worker(app="quick_app:app", concurrency=1, env=_quick_app(tmp_path))
    tasks = basic.build(make_app())
    log, release = tmp_path / "runs", tmp_path / "release"
    result = tasks.note_then_block.delay(str(log), "t", str(release))
    wait_for(lambda: lines(log), 20, "the task to start")

    lock = sqlite3.connect(str(broker.path), isolation_level=None, timeout=30)
    lock.execute("BEGIN IMMEDIATE")  # another process's long write transaction
    try:
        release.touch()
        wait_for(lambda: "BrokerUnavailable" in worker.log(), 20, "the settle to fail")
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert result.get(timeout=20) == "t"  # the stashed result is sent on the new link
    settled = _within(lambda: _messages(broker, queue) == 0, 8)

    worker.stop()  # warm: exit 0, no process died mid-task
    start_worker(concurrency=1)
    wait_for(lambda: _messages(broker, queue) == 0, 20, "the queue to be empty")
    runs = len(lines(log)) // 3
    assert settled and runs == 1, (
        f"message settled while its worker lived: {settled}; runs of the task: {runs}")


def test_busy_slots_never_stop_a_publisher_waking_an_idle_worker(
        broker: SqliteBroker, queue: str, tmp_path: Path, make_app: Callable[..., App],
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given 30 slots busy with long tasks on one queue (they don't read their wake socket),
    when a client keeps sending to that queue, each datagram it sends to a busy slot stays
    charged to the client's wake socket until read; once that fills its send buffer (~26
    busy listeners) the client renews the socket, so a task it sends to an idle worker on
    another queue still starts at once, not after the fallback look."""
    busy = unique("busy")
    start_worker("--pool", "threads", queues=[busy], concurrency=30)
    start_worker(concurrency=1)
    tasks = basic.build(make_app())
    release = tmp_path / "release"
    try:
        def round_trip() -> float:
            started = time.monotonic()
            try:
                assert tasks.add.delay(1, 1).get(timeout=10) == 2
            except TimeoutError:
                return float("inf")
            return time.monotonic() - started

        def client_can_wake() -> bool:
            """Whether the client's wake socket can still send a datagram to anyone."""
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            probe.bind(str(tmp_path / "probe.sock"))
            try:
                tasks.app.broker.waker._sock.sendto(b"\0", str(tmp_path / "probe.sock"))
                return True
            except BlockingIOError:
                return False
            finally:
                probe.close()

        baseline = [round_trip() for _ in range(3)]
        assert max(baseline) < 1.0, baseline  # the fallback look is 2 s away
        for _ in range(30):
            tasks.wait_for_file.apply_async((str(release),), queue=busy)
        wait_for(lambda: broker.queue_info(busy)["messages_unacknowledged"] == "30", 30,
                 "30 busy slots")
        for _ in range(12):  # more work for the busy queue: wake-ups to the 30 busy slots
            tasks.wait_for_file.apply_async((str(release),), queue=busy)
        after = [round_trip() for _ in range(3)]
        assert max(after) < 1.0, (f"round trips before: {baseline}, after: {after}; the "
                                  f"client's wake socket can send: {client_can_wake()}")
    finally:
        release.touch()


def test_a_message_whose_wake_up_was_lost_is_taken_by_the_fallback_look(
        broker: SqliteBroker, queue: str, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given an idle worker, when a message is committed but its wake-up datagram never
    arrives (a full buffer, a socket another user can't write to: what FALLBACK is for),
    the slot finds it anyway within FALLBACK (2 s) of its last look."""
    start_worker(concurrency=1)
    effects = tmp_path / "effects"
    db = sqlite3.connect(str(broker.path), isolation_level=None, timeout=30)
    try:
        props = {"headers": {"lang": "py", "task": "tests.apps.basic.record", "id": "lost-wake",
                             "retries": 0},
                 "content_type": "application/json", "content_encoding": "utf-8",
                 "correlation_id": "lost-wake", "reply_to": None}
        body = json.dumps([[str(effects), "ran"], {}, {}]).encode()
        db.execute("INSERT INTO messages (queue, due, body, props) VALUES (?, ?, ?, ?)",
                   (queue, time.time(), body, json.dumps(props)))  # committed; no datagram
    finally:
        db.close()
    found = _within(lambda: lines(effects) == ["ran"], 2.0 + 3.0)
    Waker(wake_dir(broker.path)).wake([queue])  # the message itself is fine: woken, it runs
    wait_for(lambda: lines(effects) == ["ran"], 10, "the message to run once woken")
    assert found, "the idle slot did not look without a wake-up within 5s (FALLBACK is 2s)"


def test_one_file_named_two_ways_is_one_broker(
        broker: SqliteBroker, queue: str, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given a client that names the file through a symlink and a worker that names it
    directly, they share one broker: the client's result comes back, and a sweep for dead
    processes (any worker's, every few seconds) finds the client and the busy slot alive
    rather than deleting the client's reply queue or giving the running task away."""
    alias = tmp_path / "alias.db"
    alias.symlink_to(broker.path)
    client = App(f"sqlite:///{alias}", default_queue=queue)
    try:
        tasks = basic.build(client)
        start_worker(concurrency=1)
        release = tmp_path / "release"
        result = tasks.wait_for_file.delay(str(release))
        wait_for(lambda: broker.queue_info(queue)["messages_unacknowledged"] == "1", 10,
                 "the task to start")
        sweeper = App(broker.url)
        try:
            assert sweeper.broker.sweep() == 0  # type: ignore[attr-defined]
        finally:
            sweeper.close()
        db = sqlite3.connect(str(broker.path))
        try:
            assert db.execute("SELECT COUNT(*) FROM reply_queues WHERE name = ?",
                              (client.replies.queue,)).fetchone()[0] == 1
        finally:
            db.close()
        release.touch()
        assert isinstance(result.get(timeout=10), int)
    finally:
        client.close()


def test_tasks_sent_in_a_burst_start_at_once_on_every_idle_slot(
        broker: SqliteBroker, queue: str, tmp_path: Path, make_app: Callable[..., App],
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given 4 idle slots, when 2 to 4 long tasks are sent back to back (a sender wakes
    nobody for a message behind an older unclaimed one: the slots woken for that one take
    the rest), they all run at once, well before the 2 s fallback look, burst after burst."""
    start_worker(concurrency=4)
    tasks = basic.build(make_app())
    for burst in range(24):
        size = 2 + burst % 3
        release = tmp_path / f"release-{burst}"
        results = [tasks.wait_for_file.delay(str(release)) for _ in range(size)]
        started = time.monotonic()
        running = str(size)
        wait_for(lambda: broker.queue_info(queue)["messages_unacknowledged"] == running,  # noqa: B023
                 10, f"{size} tasks running")
        took = time.monotonic() - started
        release.touch()
        assert len({r.get(timeout=10) for r in results}) == size  # as many slots' pids
        assert took < 1.5, f"burst {burst}: {size} tasks were all running only after {took:.2f}s"


def test_results_finishing_together_all_reach_the_caller_at_once(
        make_app: Callable[..., App], start_worker: Callable[..., WorkerProcess]) -> None:
    """Given 2 slots finishing tasks of a burst one after another, every result reaches the
    caller at once, well before its 2 s fallback look (a slot wakes nobody for a result
    behind an unread older one: the caller woken for that one reads them all), burst after
    burst."""
    start_worker(concurrency=2)
    tasks = basic.build(make_app())
    for burst in range(30):
        size = 2 + burst % 5
        started = time.monotonic()
        with tasks.app.batch():
            results = [tasks.add.delay(burst, i) for i in range(size)]
        assert [r.get(timeout=10) for r in results] == [burst + i for i in range(size)]
        took = time.monotonic() - started
        assert took < 1.5, f"burst {burst}: {size} results took {took:.2f}s"


def _session_wakeups(session: int) -> dict[int, tuple[str, int]]:
    """pid -> (comm, voluntary context switches) of every process in ``session``."""
    found: dict[int, tuple[str, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            status = (entry / "status").read_text()
        except OSError:
            continue
        switches = int(status.split("voluntary_ctxt_switches:")[1].split()[0])
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == session:  # field 6: session id
            found[int(entry.name)] = (comm, switches)
    return found


def test_a_slot_waiting_on_its_executor_does_not_spin(
        broker: SqliteBroker, queue: str, tmp_path: Path, make_app: Callable[..., App],
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given a task with a hard time limit (it runs in the slot's executor, the slot's loop
    waits meanwhile), the busy slot sleeps until something happens even once its last look is
    older than the fallback's 2 s: only an idle slot looks on the fallback (a busy one looks
    when it settles). Woken counts are measured over 3 s (a rate needs a window)."""
    worker = start_worker("--time-limit", "60", concurrency=1)
    tasks = basic.build(make_app())
    release = tmp_path / "release"
    result = tasks.wait_for_file.delay(str(release))
    try:
        wait_for(lambda: broker.queue_info(queue)["messages_unacknowledged"] == "1", 10,
                 "the task running")
        time.sleep(2.5)  # past FALLBACK since the claim (the condition under test, not a wait)
        before = _session_wakeups(worker.pid)
        time.sleep(3.0)
        after = _session_wakeups(worker.pid)
        used = {pid: after[pid][1] - before[pid][1] for pid in after if pid in before}
        busiest = max(used, key=used.__getitem__)
        assert used[busiest] < 600, (
            f"process {busiest} woke {used[busiest]} times in 3s while its slot waited on a "
            f"running task (the executor polls its file 100 times a second): {used}")
    finally:
        release.touch()
    assert isinstance(result.get(timeout=10), int)

def _rows(broker: SqliteBroker, sql: str, *params: object) -> list[tuple[object, ...]]:
    db = sqlite3.connect(str(broker.path), timeout=30)
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


def test_a_link_lost_while_the_executor_runs_never_lets_a_second_slot_run_it_at_once(
        broker: SqliteBroker, queue: str, tmp_path: Path, make_app: Callable[..., App],
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given a time-limited task running in a slot's executor, when that slot's link fails
    (its sweep's write finds the file locked past publish_timeout) the slot reconnects while
    the task still runs: the message stays held by its process until the task has finished
    (a dropped link's messages are given back only when the new link starts taking work),
    so no idle worker starts it meanwhile; afterwards any rerun starts after the first run."""
    (tmp_path / "quick_app.py").write_text(QUICK_APP)  # gives up on a lock after 1 s
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}"}
    worker = start_worker("--time-limit", "60", app="quick_app:app", concurrency=1, env=env)
    tasks = basic.build(make_app())
    effects, release = tmp_path / "effects", tmp_path / "release"
    result = tasks.note_overlap_then_block.delay(str(effects), "t", str(release))
    try:
        wait_for(lambda: effects.exists() and len(effects.read_text().split()) == 3, 20,
                 "the task to start")
        [(holder,)] = _rows(broker, "SELECT holder FROM messages WHERE queue = ?", queue)
        start_worker(concurrency=1)  # idle, ready to take what comes back
        lock = sqlite3.connect(str(broker.path), isolation_level=None, timeout=30)
        try:  # a holder nobody holds (dead): the next sweep writes, and finds the file locked
            lock.execute("INSERT INTO holders (id, pid, host, started) VALUES (?, 1, 'x', 0)",
                         (secrets.randbits(62) + 1,))
            lock.execute("BEGIN IMMEDIATE")
            wait_for(lambda: "BrokerUnavailable" in worker.log(), 20, "the slot's link to fail")
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        wait_for(lambda: "reconnected to the broker" in worker.log(), 20, "the new link")
        held = [row[0] for row in _rows(broker, "SELECT holder FROM messages WHERE queue = ?",
                                        queue)]
        assert held == [holder], f"held by {held}, not by the running slot's process {holder}"
    finally:
        release.touch()
    assert result.get(timeout=20) == "t"
    wait_for(lambda: not _rows(broker, "SELECT id FROM messages WHERE queue = ?", queue), 20,
             "the message settled")
    words = effects.read_text().split()
    assert words[4::3] in ([], ["False"]), f"a rerun overlapped the first run: {words}"
