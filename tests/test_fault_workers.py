"""Faults on the worker side, caused for real: kill -9, poison, signals, time limits, lost acks.

Each test breaks something and then counts side effects (lines a task appended to a file) to
show that nothing was lost and nothing ran more often than at-least-once allows.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

import taskq
from taskq import App

from .support import Broker, WorkerProcess, lines, rabbitmqctl, wait_for


def _pid(path: Path) -> int:
    wait_for(lambda: path.exists() and path.read_text().strip(), 15, f"a pid in {path.name}")
    return int(path.read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_slot_process_killed_mid_task_is_replaced_and_the_task_runs_again(
        tasks: SimpleNamespace, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given a task running in a slot's process, when that process is killed (-9), the worker
    starts a new slot process, the task runs again, and the caller gets exactly one result;
    the worker still runs two tasks at once afterwards."""
    worker = start_worker(concurrency=2)
    pid_file, release = tmp_path / "pid", tmp_path / "release"
    result = tasks.pid_then_block.delay(str(pid_file), str(release))
    first = _pid(pid_file)
    pid_file.unlink()
    os.kill(first, signal.SIGKILL)
    second = _pid(pid_file)  # the same task, started again in a new process
    assert second != first and not _alive(first)
    release.touch()
    assert result.get(timeout=15) == "released"
    assert "killed by SIGKILL while running task tests.apps.basic.pid_then_block" in worker.log()
    both = [tasks.rendezvous.delay(str(tmp_path), name, ["a", "b"]) for name in ("a", "b")]
    assert len({r.get(timeout=20) for r in both}) == 2


def test_a_whole_worker_killed_mid_task_loses_nothing(
        tasks: SimpleNamespace, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given a worker busy with 2 tasks and 10 more queued, when the whole worker is killed
    (-9, every process), a new worker completes all 12: each caller gets one result."""
    worker = start_worker(concurrency=2)
    effects, release = tmp_path / "effects", tmp_path / "release"
    blockers = [tasks.pid_then_block.delay(str(tmp_path / f"pid{i}"), str(release))
                for i in range(2)]
    for i in range(2):
        _pid(tmp_path / f"pid{i}")
    queued = [tasks.record.delay(str(effects), f"q{i}") for i in range(10)]
    worker.kill()
    release.touch()
    start_worker(concurrency=2)
    assert [b.get(timeout=30) for b in blockers] == ["released", "released"]
    assert [q.get(timeout=30) for q in queued] == [f"q{i}" for i in range(10)]
    assert sorted(lines(effects)) == sorted(f"q{i}" for i in range(10))


def test_a_run_cut_short_comes_back_first_and_flagged_redelivered(
        tasks: SimpleNamespace, broker: Broker, queue: str, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given one slot running task A with B and C queued behind it, when the slot process is
    killed (-9), A runs again before B and C (it kept its place, where taskq 0.1 put a
    counted copy at the back), its request says ``delivery_info["redelivered"]`` (the usual
    idempotency check), and each caller gets one result; nothing is dead-lettered."""
    worker = start_worker(concurrency=1)
    log, release = tmp_path / "runs", tmp_path / "release"
    first = tasks.note_then_block.delay(str(log), "A", str(release))
    wait_for(lambda: log.exists() and log.read_text().strip(), 15, "A to start")
    behind = [tasks.note_then_block.delay(str(log), name, str(release)) for name in "BC"]
    os.kill(int(log.read_text().split()[2]), signal.SIGKILL)
    wait_for(lambda: len(log.read_text().splitlines()) == 2, 20, "A to run again")
    release.touch()
    assert [r.get(timeout=20) for r in (first, *behind)] == ["A", "B", "C"]
    runs = [line.split()[:2] for line in log.read_text().splitlines()]
    assert runs == [["A", "False"], ["A", "True"], ["B", "False"], ["C", "False"]]
    wait_for(lambda: "killed by SIGKILL while running task" in worker.log(), 10, "the log")
    assert not broker.exists(f"{queue}.dlq") or broker.counts(f"{queue}.dlq")[0] == 0


def test_killing_only_the_supervisor_takes_its_task_processes_down(
        tasks: SimpleNamespace, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """A slot process whose supervisor died must not keep running a task as an orphan (its
    message is being redelivered elsewhere)."""
    worker = start_worker(concurrency=1)
    pid_file = tmp_path / "pid"
    tasks.pid_then_block.delay(str(pid_file), str(tmp_path / "never"))
    child = _pid(pid_file)
    os.kill(worker.pid, signal.SIGKILL)
    wait_for(lambda: not _alive(child), 10, "the orphaned task process to exit")


def test_a_poison_task_is_tried_delivery_limit_times_then_dead_lettered(
        tasks: SimpleNamespace, broker: Broker, queue: str, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given a task that kills its own process every time, it is attempted exactly 3 times
    (the default delivery_limit), then dead-lettered; its caller gets WorkerLostError; and
    50 other tasks sent alongside all complete meanwhile."""
    worker = start_worker(concurrency=2)
    attempts = tmp_path / "attempts"
    poison = tasks.die.delay(str(attempts))
    others = [tasks.add.delay(i, 1) for i in range(50)]
    assert [r.get(timeout=30) for r in others] == [i + 1 for i in range(50)]
    with pytest.raises(taskq.WorkerLostError, match="attempted 3 times"):
        poison.get(timeout=30)
    assert lines(attempts) == ["attempt"] * 3
    [letter] = broker.take_dead_letters(queue)
    assert letter.exception == "WorkerLostError"
    assert "attempted 3 times" in letter.reason
    assert worker.log().count("exit code 13 while running task tests.apps.basic.die") == 3
    assert worker.proc.poll() is None


def test_a_poison_task_that_kills_the_whole_worker_is_counted_across_restarts(
        tasks: SimpleNamespace, broker: Broker, queue: str, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """With --pool threads a task that exits the process takes the whole worker down. Classic
    queues keep no delivery count, so taskq records it in the message: restarting the worker
    (as a service manager would) runs it at most 3 times, then it is dead-lettered."""
    attempts = tmp_path / "attempts"
    poison = tasks.die.delay(str(attempts))
    for attempt in range(1, 4):
        worker = start_worker("--pool", "threads", concurrency=1, ready=False)
        wait_for(lambda n=attempt: len(lines(attempts)) == n, 15, f"attempt {attempt}")
        assert worker.wait(15) == 13
    start_worker("--pool", "threads", concurrency=1)
    with pytest.raises(taskq.WorkerLostError, match="attempted 3 times"):
        poison.get(timeout=20)
    assert lines(attempts) == ["attempt"] * 3
    assert broker.counts(f"{queue}.dlq")[0] == 1


def test_warm_shutdown_finishes_running_tasks_and_leaves_the_rest_queued(
        tasks: SimpleNamespace, broker: Broker, queue: str, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given one running task and 5 queued, SIGTERM lets the running one finish and be acked,
    takes nothing new, and exits 0; the 5 stay in the queue for the next worker."""
    worker = start_worker(concurrency=1)
    pid_file, release = tmp_path / "pid", tmp_path / "release"
    running = tasks.pid_then_block.delay(str(pid_file), str(release))
    _pid(pid_file)
    queued = [tasks.add.delay(i, 0) for i in range(5)]
    worker.signal(signal.SIGTERM)
    wait_for(lambda: "warm shutdown" in worker.log(), 10, "the worker to start shutting down")
    release.touch()
    assert running.get(timeout=15) == "released"
    assert worker.wait(20) == 0
    info = broker.queue_info(queue)
    assert (info["messages_ready"], info["messages_unacknowledged"]) == ("5", "0")
    start_worker(concurrency=1)
    assert [r.get(timeout=15) for r in queued] == [0, 1, 2, 3, 4]


def test_sigterm_to_the_whole_process_group_is_a_warm_shutdown(
        tasks: SimpleNamespace, broker: Broker, queue: str, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given two running tasks, a SIGTERM to every process of the worker (what systemd's
    default KillMode, or `kill -- -PGID`, sends) is a warm shutdown: both tasks finish and are
    acked once, no slot is taken for dead (none restarts), and nothing runs again later."""
    worker = start_worker(concurrency=2)
    effects, release = tmp_path / "effects", tmp_path / "release"
    running = [tasks.note_then_block.delay(str(effects), f"t{i}", str(release))
               for i in range(2)]
    wait_for(lambda: len(lines(effects)) == 6, 15, "both tasks to start")  # 3 words a run
    os.killpg(worker.pid, signal.SIGTERM)
    wait_for(lambda: "warm shutdown" in worker.log(), 10, "the worker to start shutting down")
    release.touch()
    assert sorted(r.get(timeout=15) for r in running) == ["t0", "t1"]
    assert worker.wait(20) == 0
    assert "exit code" not in worker.log() and "starting a new one" not in worker.log()
    info = broker.queue_info(queue)
    assert (info["messages_ready"], info["messages_unacknowledged"]) == ("0", "0")
    start_worker(concurrency=1)
    assert tasks.add.delay(1, 1).get(timeout=15) == 2  # the next worker ran only this
    assert len(lines(effects)) == 6


def _forkserver_of(worker: WorkerProcess) -> int:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if f"PPid:\t{worker.pid}\n" in status and b"forkserver" in cmdline:
            return int(entry.name)
    raise AssertionError(f"no fork server under worker {worker.pid}")


def test_a_dead_fork_server_never_lets_a_task_run_twice_at_once(
        tasks: SimpleNamespace, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given two running tasks and another worker idle, when the first worker's fork server
    is killed (-9: the OOM killer's choice), its supervisor can no longer learn its slots'
    exit status (it reads 255) while they still run: it stops them before their messages go
    back, so when a task starts again (anywhere) its first run is already gone."""
    worker = start_worker(concurrency=2)
    effects, release = tmp_path / "effects", tmp_path / "release"
    running = [tasks.note_overlap_then_block.delay(str(effects), f"t{i}", str(release))
               for i in range(2)]
    wait_for(lambda: len(lines(effects)) == 6, 15, "both tasks to start")
    start_worker(concurrency=2)  # idle, ready to take what comes back at once
    os.kill(_forkserver_of(worker), signal.SIGKILL)
    wait_for(lambda: len(lines(effects)) == 12, 30, "both tasks to start again")
    # Each second run looked, as it started, whether its first run was still running.
    assert lines(effects)[7::3] == ["False", "False"], lines(effects)
    release.touch()
    assert sorted(r.get(timeout=15) for r in running) == ["t0", "t1"]


def test_a_second_signal_stops_at_once_and_the_message_returns_to_the_queue(
        tasks: SimpleNamespace, broker: Broker, queue: str, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    worker = start_worker(concurrency=1)
    pid_file, release = tmp_path / "pid", tmp_path / "release"
    running = tasks.pid_then_block.delay(str(pid_file), str(release))
    child = _pid(pid_file)
    worker.signal(signal.SIGINT)
    wait_for(lambda: "warm shutdown" in worker.log(), 10, "the warm shutdown")
    worker.signal(signal.SIGINT)
    assert worker.wait(10) != 0
    wait_for(lambda: not _alive(child), 10, "the task process to be stopped")
    wait_for(lambda: broker.queue_info(queue)["messages_ready"] == "1", 10,
             "the interrupted message back in the queue")
    release.touch()
    start_worker(concurrency=1)
    assert running.get(timeout=15) == "released"


def test_a_task_that_overruns_the_shutdown_timeout_is_stopped_and_returned(
        tasks: SimpleNamespace, broker: Broker, queue: str, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    worker = start_worker("--shutdown-timeout", "1", concurrency=1)
    pid_file = tmp_path / "pid"
    tasks.pid_then_block.delay(str(pid_file), str(tmp_path / "never"))
    _pid(pid_file)
    worker.signal(signal.SIGTERM)
    assert worker.wait(15) == 1
    assert "shutdown_timeout of 1s passed" in worker.log()
    wait_for(lambda: broker.queue_info(queue)["messages_ready"] == "1", 10,
             "the message back in the queue")


# -- time limits -----------------------------------------------------------------------------


@pytest.fixture
def limits(make_app: Callable[..., App], start_worker: Callable[..., WorkerProcess]
           ) -> SimpleNamespace:
    from .apps import limits

    start_worker(app="tests.apps.limits:app", concurrency=1)
    return limits.build(make_app())


def test_a_hard_time_limit_stops_the_task_and_its_caller_is_told(
        limits: SimpleNamespace, broker: Broker, queue: str) -> None:
    """Given time_limit=1 on a task that sleeps 30s, the caller gets TimeLimitExceeded after
    about a second, the message is acked (not redelivered forever), and the slot runs the next
    time-limited task in a fresh process."""
    before = limits.whoami.apply_async(time_limit=30).get(timeout=10)
    with pytest.raises(taskq.TimeLimitExceeded, match="time_limit=1s"):
        limits.overrun.delay(30).get(timeout=10)
    after = limits.whoami.apply_async(time_limit=30).get(timeout=10)
    assert after != before
    assert limits.whoami.delay().get(timeout=10) not in (before, after)  # no limit: in the slot
    info = broker.queue_info(queue)
    assert (info["messages_ready"], info["messages_unacknowledged"]) == ("0", "0")


def test_a_call_can_set_its_own_hard_limit(limits: SimpleNamespace) -> None:
    """The task says time_limit=1; this call says 0.5, and the call wins."""
    with pytest.raises(taskq.TimeLimitExceeded, match="time_limit=0.5s"):
        limits.overrun.apply_async((30,), time_limit=0.5).get(timeout=10)


def test_a_task_sees_its_own_time_limits_in_its_request(limits: SimpleNamespace) -> None:
    assert limits.my_limits.delay().get(timeout=10) == [20.0, 10.0]
    assert limits.my_limits.apply_async(time_limit=5).get(timeout=10) == [5.0, 10.0]


def test_a_soft_time_limit_lets_the_task_clean_up(limits: SimpleNamespace,
                                                  tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    assert limits.tidy.delay(str(marker), 30).get(timeout=10) == "stopped early, cleaned up"
    assert marker.read_text() == "cleaned up"


def test_the_worker_flag_sets_a_default_time_limit(
        tasks: SimpleNamespace, start_worker: Callable[..., WorkerProcess]) -> None:
    start_worker("--time-limit", "0.5", concurrency=1)
    with pytest.raises(taskq.TimeLimitExceeded):
        tasks.sleep_for.delay(30).get(timeout=10)
    assert tasks.add.delay(1, 1).get(timeout=10) == 2


# -- the connection between running and acking ---------------------------------------------


@pytest.mark.rabbitmq
def test_a_connection_lost_before_the_ack_is_not_run_twice_by_the_same_slot(
        tasks: SimpleNamespace, broker: Broker, queue: str, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given a running task, when the broker closes the slot's connection before the task
    finishes, the task still finishes and its caller gets the result; the broker gives the
    message back (it was never acked) to the same slot, which knows it finished and settles
    it without running it a second time."""
    worker = start_worker(concurrency=1)
    pid_file, release = tmp_path / "pid", tmp_path / "release"
    result = tasks.pid_then_block.delay(str(pid_file), str(release))
    _pid(pid_file)
    pid_file.unlink()
    assert broker.close_connections("taskq worker slot-1 pid=") == 1  # the one it consumes on
    release.touch()
    assert result.get(timeout=15) == "released"
    wait_for(lambda: "settled without running it again" in worker.log(), 15,
             "the redelivered message to be settled")
    assert not pid_file.exists()  # it did not run again
    info = broker.queue_info(queue)
    assert (info["messages_ready"], info["messages_unacknowledged"]) == ("0", "0")


@pytest.mark.rabbitmq
def test_a_connection_lost_before_the_ack_runs_the_task_elsewhere_and_the_caller_sees_one(
        tasks: SimpleNamespace, broker: Broker, queue: str, tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given a running task whose slot loses its connection, a second worker gets the
    message back and runs it too (at-least-once: the first run may never have finished);
    both runs finish, and the caller gets exactly one result."""
    first = start_worker(concurrency=1)
    pid_file, release = tmp_path / "pid", tmp_path / "release"
    result = tasks.pid_then_block.delay(str(pid_file), str(release))
    first_pid = _pid(pid_file)
    pid_file.unlink()
    assert broker.close_connections("taskq worker slot-1 pid=") == 1
    start_worker(concurrency=1)
    second_pid = _pid(pid_file)  # the same task, run by the other worker
    assert second_pid != first_pid
    release.touch()
    assert result.get(timeout=15) == "released"
    wait_for(lambda: "will deliver it again" in first.log(), 10, "the first worker to say so")
    wait_for(lambda: broker.queue_info(queue)["messages_unacknowledged"] == "0", 15,
             "both runs to be settled")
    assert broker.queue_info(queue)["messages_ready"] == "0"
    assert result.get(timeout=0) == "released"


@pytest.fixture
def short_consumer_timeout(broker: Broker) -> Iterator[None]:
    """RabbitMQ's consumer_timeout (30 min by default), shortened to 2s for new channels."""
    rabbitmqctl("eval", "application:set_env(rabbit, channel_tick_interval, 500).")
    rabbitmqctl("eval", "application:set_env(rabbit, consumer_timeout, 2000).")
    try:
        yield
    finally:
        rabbitmqctl("eval", "application:set_env(rabbit, consumer_timeout, 1800000).")
        rabbitmqctl("eval", "application:set_env(rabbit, channel_tick_interval, 60000).")


@pytest.mark.rabbitmq
def test_a_consumer_timeout_is_explained_and_the_worker_recovers(
        short_consumer_timeout: None, tasks: SimpleNamespace,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given a task that holds its message longer than the broker's consumer_timeout, the
    worker logs what happened and how to fix it, reconnects, and keeps serving; the caller
    gets one result."""
    worker = start_worker(concurrency=1)
    result = tasks.sleep_for.delay(4)
    wait_for(lambda: "Raise consumer_timeout on the broker" in worker.log(), 15,
             "the timeout to be reported with its fix")
    assert result.get(timeout=30) == 4
    assert tasks.add.delay(2, 2).get(timeout=15) == 4
