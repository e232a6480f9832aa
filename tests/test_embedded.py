"""The embedded broker's own promises: a file it can't use is one clear line, kill -9 of any
process loses nothing, many processes share one file, a long reader blocks nobody.

(The contract itself, on this broker and on RabbitMQ, is in the other test modules: every
test there that takes ``broker`` runs on both.)
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import taskq
from taskq import App
from taskq.broker.sqlite.store import filesystem_type

from .apps import basic
from .support import ROOT, SqliteBroker, WorkerProcess, lines, run_taskq, wait_for

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
