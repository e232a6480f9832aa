"""Periodic tasks: ``app.schedule`` fired by real ``taskq beat`` (and ``taskq worker --beat``)
processes on both brokers. Once per due time with one beat or several, through kill -9 of
the active one, and across a downtime as the missed policy says.

The schedule is :mod:`tests.apps.scheduled`: entries ``late``, ``skip`` and ``delayed`` (sent
with a countdown) every 0.5 s, whose task notes each run (entry, due time, task id, when it
ran) in a file; each test counts runs per due time there. Each test has a schedule
(``beat_name``) and a queue of its own.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

import taskq
from taskq import App
from taskq.beat import TAKEOVER
from taskq.schedules import CRON_EXTRA, GRACE, Entry, fire_id, make_entry, plan

from .apps import basic, scheduled
from .support import ROOT, Broker, ChildProcess, WorkerProcess, run_taskq, unique, wait_for

APP = "tests.apps.scheduled:app"
EVERY = 0.5
ENTRIES = ("late", "skip", "delayed")
#: What a test tolerates beyond the bound it checks: a busy machine, polling a log file.
SLACK = 1.0
FIRED = re.compile(r"beat: fired (\S+) \((\S+)\[(\S+)\]\) due (\S+)")


# -- beat processes and what they leave behind ------------------------------------------------


class BeatProcess(ChildProcess):
    """A real ``taskq beat`` subprocess with its log captured to a file."""

    def __init__(self, broker: Broker, env: dict[str, str], log_path: Path, *args: str) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        environment = {**os.environ, "TASKQ_BROKER_URL": broker.url, "PYTHONUNBUFFERED": "1",
                       **env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "taskq", "beat", "-A", APP, *args], cwd=ROOT,
            env=environment, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_log(self, text: str, timeout: float = 20) -> None:
        def found() -> bool:
            if text in self.log():
                return True
            if self.proc.poll() is not None:
                raise AssertionError(f"beat exited with {self.proc.returncode}:\n{self.log()}")
            return False
        wait_for(found, timeout, f"{text!r} in the beat's log", interval=0.02)

    def role(self) -> str | None:
        log = self.log()
        return "active" if "beat: active for" in log or "beat: took over" in log else \
            "standby" if "beat: standby" in log else None



@dataclass(frozen=True)
class Run:
    entry: str
    due: float
    task_id: str
    ran_at: float


def runs(path: Path, entry: str | None = None) -> list[Run]:
    """The task's runs, noted in ``path``, in the order they ran."""
    found = []
    for line in path.read_text().splitlines() if path.exists() else []:
        name, due, task_id, ran_at = line.split()
        found.append(Run(name, datetime.fromisoformat(due).timestamp(), task_id, float(ran_at)))
    return [r for r in found if entry is None or r.entry == entry]


def fired(*logs: str) -> set[tuple[str, float]]:
    """(entry, due time) of every fire logged in ``logs`` (beats' or workers')."""
    return {(m[1], datetime.fromisoformat(m[4]).timestamp())
            for log in logs for m in FIRED.finditer(log)}


def grid(dues: list[float]) -> bool:
    """Whether due times are one interval apart, none left out."""
    return all(abs(b - a - EVERY) < 0.005 for a, b in itertools.pairwise(sorted(dues)))


def settled(broker: Broker, queue: str, path: Path, logs: list[str]) -> list[Run]:
    """Once the beats stopped: wait until every fire they logged ran and nothing more is
    queued or running; return the runs."""
    expected = fired(*logs)
    wait_for(lambda: expected <= {(r.entry, r.due) for r in runs(path)}, 20,
             f"the {len(expected)} fired tasks to run")

    def idle() -> bool:
        info = broker.queue_info(queue)
        return info["messages_ready"] == "0" and info["messages_unacknowledged"] == "0"
    wait_for(idle, 20, f"queue {queue} to be empty")
    return runs(path)


def check_once_each(found: list[Run], schedule: str, entry: str) -> list[float]:
    """Each due time of ``entry`` ran once, under its deterministic task id; the due times."""
    mine = [r for r in found if r.entry == entry]
    counts = Counter(round(r.due, 3) for r in mine)
    assert [due for due, n in counts.items() if n > 1] == [], "a due time ran twice"
    assert all(r.task_id == fire_id(schedule, entry, r.due) for r in mine)
    return sorted(counts)


@pytest.fixture
def beat_env(queue: str, tmp_path: Path) -> dict[str, str]:
    """What the schedule's processes (beats and workers) read: a schedule of the test's own."""
    return {"TASKQ_TEST_QUEUE": queue, "TASKQ_TEST_BEAT_NAME": unique("beat"),
            "TASKQ_TEST_BEAT_FILE": str(tmp_path / "runs")}


@pytest.fixture
def start_beat(broker: Broker, beat_env: dict[str, str], tmp_path: Path
               ) -> Iterator[Callable[..., BeatProcess]]:
    """Start real ``taskq beat`` processes; each is stopped after the test."""
    beats: list[BeatProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> BeatProcess:
        beat = BeatProcess(broker, {**beat_env, **(env or {})},
                           tmp_path / f"beat-{len(beats) + 1}.log", *args)
        beats.append(beat)
        return beat

    yield start
    for beat in beats:
        beat.stop()


def wait_runs(path: Path, count: int, timeout: float = 20) -> None:
    """Until each entry ran ``count`` times."""
    wait_for(lambda: all(len(runs(path, e)) >= count for e in ENTRIES), timeout,
             f"{count} runs of each entry")


# -- one beat, several, kill -9 ------------------------------------------------------------------


def test_a_schedule_fires_every_half_second_each_due_time_once(
        broker: Broker, queue: str, beat_env: dict[str, str], tmp_path: Path,
        start_worker: Callable[..., WorkerProcess],
        start_beat: Callable[..., BeatProcess]) -> None:
    """Given entries every 0.5 s and one worker, when one beat runs, then the task runs once
    per due time, the due times one interval apart, each run on time (within a second)."""
    start_worker(app=APP, env=beat_env)
    beat = start_beat()
    path = tmp_path / "runs"
    wait_runs(path, 6)
    assert beat.stop() == 0 and "beat: stopped" in beat.log()
    found = settled(broker, queue, path, [beat.log()])
    for entry in ENTRIES:
        dues = check_once_each(found, beat_env["TASKQ_TEST_BEAT_NAME"], entry)
        assert len(dues) >= 6 and grid(dues), dues
    lateness = sorted(r.ran_at - r.due for r in found if r.entry != "delayed")
    assert lateness[len(lateness) // 2] < 0.1 and lateness[-1] < SLACK, lateness
    delayed = sorted(r.ran_at - r.due for r in found if r.entry == "delayed")
    assert delayed[0] >= scheduled.DELAY and delayed[-1] < scheduled.DELAY + SLACK, delayed


def test_of_two_beats_one_is_active_and_each_due_time_fires_once(
        broker: Broker, queue: str, beat_env: dict[str, str], tmp_path: Path,
        start_worker: Callable[..., WorkerProcess],
        start_beat: Callable[..., BeatProcess]) -> None:
    start_worker(app=APP, env=beat_env)
    beats = [start_beat(), start_beat()]
    wait_for(lambda: all(b.role() for b in beats), 20, "both beats to say their role")
    assert sorted(b.role() or "" for b in beats) == ["active", "standby"]
    path = tmp_path / "runs"
    wait_runs(path, 6)
    for beat in beats:
        beat.stop()
    standby = next(b for b in beats if b.role() == "standby")
    assert "fired" not in standby.log()
    found = settled(broker, queue, path, [b.log() for b in beats])
    for entry in ENTRIES:
        dues = check_once_each(found, beat_env["TASKQ_TEST_BEAT_NAME"], entry)
        assert len(dues) >= 6 and grid(dues), dues


def test_a_standby_takes_over_from_a_killed_beat_and_no_due_time_is_lost_or_doubled(
        broker: Broker, queue: str, beat_env: dict[str, str], tmp_path: Path,
        start_worker: Callable[..., WorkerProcess],
        start_beat: Callable[..., BeatProcess]) -> None:
    """Given an active beat and a standby, when the active one is killed with kill -9 (three
    times, a new standby started each time), then the standby takes over within the bound,
    and over the whole run every due time ran exactly once: none twice, none missing."""
    start_worker(app=APP, env=beat_env)
    path = tmp_path / "runs"
    active = start_beat()
    active.wait_log("beat: active for")
    standby = start_beat()
    standby.wait_log("beat: standby")
    beats = [active, standby]
    takeovers = []
    for _ in range(3):
        wait_runs(path, len(runs(path, "late")) + 2)
        active.kill()
        killed = time.monotonic()
        standby.wait_log("beat: took over", timeout=TAKEOVER + SLACK + 5)
        takeovers.append(time.monotonic() - killed)
        active, standby = standby, start_beat()
        beats.append(standby)
        standby.wait_log("beat: standby")
    wait_runs(path, len(runs(path, "late")) + 2)
    for beat in beats:
        beat.stop()
    assert max(takeovers) < TAKEOVER + SLACK, takeovers
    found = settled(broker, queue, path, [b.log() for b in beats])
    for entry in ENTRIES:
        dues = check_once_each(found, beat_env["TASKQ_TEST_BEAT_NAME"], entry)
        assert grid(dues), dues  # none missing: fires due while no beat was active came late
    assert max(r.ran_at - r.due for r in found) < GRACE


# -- the missed policy -----------------------------------------------------------------------------


MISSED = re.compile(r"beat: (\S+) missed (\d+) due time\(s\)")


def test_after_a_downtime_late_fires_once_for_the_latest_missed_and_skip_fires_none(
        broker: Broker, queue: str, beat_env: dict[str, str], tmp_path: Path,
        start_worker: Callable[..., WorkerProcess],
        start_beat: Callable[..., BeatProcess]) -> None:
    """Given a beat stopped over several due times (more than the grace late), when a beat
    starts again, then entry ``late`` fires once, for the latest due time missed, and entry
    ``skip`` fires none of them and goes on with the next; the log says how many."""
    start_worker(app=APP, env=beat_env)
    path = tmp_path / "runs"
    first = start_beat()
    wait_runs(path, 3)
    first.stop()
    last = max(due for _, due in fired(first.log()))
    # The downtime is the scenario: the beat stays down over seven due times.
    time.sleep(max(0.0, last + 7 * EVERY - time.time()))
    second = start_beat()
    second.wait_log("beat: skip missed")
    second.wait_log("beat: late missed")
    second.wait_log("beat: delayed missed")
    wait_runs(path, len(runs(path, "late")) + 3)
    second.stop()
    found = settled(broker, queue, path, [first.log(), second.log()])
    missed = {m[1]: int(m[2]) for m in MISSED.finditer(second.log())}
    assert all(missed[entry] >= 6 for entry in ENTRIES), missed
    assert "missed='late': firing once, late, for the latest" in second.log()
    assert "missed='skip': skipped them, next due" in second.log()
    schedule = beat_env["TASKQ_TEST_BEAT_NAME"]
    for entry, fired_for_missed in (("late", 1), ("skip", 0), ("delayed", 1)):
        dues = check_once_each(found, schedule, entry)
        before = [d for d in dues if d <= last + 0.001]
        after = [d for d in dues if d > last + 0.001]
        assert grid(before) and grid(after)
        # the first due time fired after the downtime: the latest missed, or the one after it
        assert abs(after[0] - (last + (missed[entry] + 1 - fired_for_missed) * EVERY)) < 0.005
    restarted = [r for r in found if r.entry == "skip" and r.due > last + 0.001]
    assert restarted[0].ran_at - restarted[0].due < EVERY  # on time: a future due time


# -- taskq beat --list, errors ---------------------------------------------------------------------


def test_beat_list_shows_each_entry_with_its_last_fire_and_next_due_time(
        broker: Broker, beat_env: dict[str, str],
        start_beat: Callable[..., BeatProcess]) -> None:
    beat = start_beat()
    beat.wait_log("beat: fired skip")
    beat.stop()
    last = max(due for entry, due in fired(beat.log()) if entry == "late")
    out = run_taskq("beat", "-A", APP, "--list", env={**beat_env, "TASKQ_BROKER_URL": broker.url})
    assert out.returncode == 0, out.stderr
    table = {line.split()[0]: line for line in out.stdout.splitlines()}
    assert table["NAME"].split() == ["NAME", "TASK", "SCHEDULE", "LAST", "FIRED", "NEXT", "DUE"]
    late = table["late"].split()
    assert late[1:4] == ["tests.apps.scheduled.note", "every", "0.5s"]
    assert datetime.fromisoformat(late[4]).timestamp() == pytest.approx(last, abs=0.001)
    assert datetime.fromisoformat(late[5]).timestamp() == pytest.approx(last + EVERY, abs=0.001)
    morning = table["morning"]
    assert re.search(r"tests\.apps\.basic\.add +cron '0 7 \* \* mon-fri' \(Europe/Berlin\) +"
                     r"never ", morning), morning
    next_due = datetime.fromisoformat(morning.split()[-1])
    assert next_due.astimezone(ZoneInfo("Europe/Berlin")).strftime("%H:%M") == "07:00"
    assert next_due.weekday() < 5 and next_due.timestamp() > time.time()


def _away(broker: Broker, tmp_path: Path) -> str:
    """A URL of the broker under test's kind that can't be used."""
    if broker.kind == "rabbitmq":
        return "amqp://guest:guest@127.0.0.1:1/"
    return f"sqlite:///{tmp_path}/missing/taskq.db"


def test_beat_list_without_a_broker_is_a_one_line_error(
        broker: Broker, beat_env: dict[str, str], tmp_path: Path) -> None:
    out = run_taskq("beat", "-A", APP, "--list",
                    env={**beat_env, "TASKQ_BROKER_URL": _away(broker, tmp_path)})
    assert out.returncode == 1 and out.stdout == ""
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.startswith("Error: ")
    assert ("could not reach the broker at amqp://guest:****@127.0.0.1:1/" in out.stderr
            if broker.kind == "rabbitmq" else "does not exist" in out.stderr), out.stderr


def test_a_beat_waits_for_a_broker_that_is_away_and_stops_on_sigterm(
        broker: Broker, tmp_path: Path, start_beat: Callable[..., BeatProcess]) -> None:
    if broker.kind == "sqlite":  # a file that can't be used will not become usable: an error
        out = run_taskq("beat", "-A", APP, env={"TASKQ_BROKER_URL": _away(broker, tmp_path)})
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.strip().splitlines()[-1].startswith("Error: cannot use"), out.stderr
        return
    beat = start_beat(env={"TASKQ_BROKER_URL": _away(broker, tmp_path)})
    beat.wait_log("beat: the broker at amqp://guest:****@127.0.0.1:1/ is away")
    assert beat.stop() == 0
    assert "Traceback" not in beat.log() and "beat: stopped" in beat.log()


# -- taskq worker --beat ---------------------------------------------------------------------


def test_workers_with_beat_fire_the_schedule_and_one_takes_over_when_the_other_stops(
        broker: Broker, queue: str, beat_env: dict[str, str], tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given two workers started with --beat, then one beat fires the schedule; when its
    worker stops (SIGTERM), the other's takes over at once; every due time ran once."""
    path = tmp_path / "runs"
    first = start_worker("--beat", app=APP, env=beat_env)
    wait_for(lambda: "beat: active for" in first.log(), 20, "the first worker's beat to lead")
    second = start_worker("--beat", app=APP, env=beat_env)
    wait_for(lambda: "beat: standby" in second.log(), 20, "the second worker's beat to stand by")
    wait_runs(path, 3)
    first.signal(signal.SIGTERM)
    assert first.wait() == 0
    wait_for(lambda: "beat: took over" in second.log(), TAKEOVER + SLACK + 5,
             "the second worker's beat to take over")
    wait_runs(path, len(runs(path, "late")) + 3)
    second.signal(signal.SIGTERM)
    assert second.wait() == 0
    start_worker(app=APP, env=beat_env)  # runs what a warm shutdown left queued
    found = settled(broker, queue, path, [first.log(), second.log()])
    for entry in ENTRIES:
        dues = check_once_each(found, beat_env["TASKQ_TEST_BEAT_NAME"], entry)
        assert len(dues) >= 6 and grid(dues), dues


# -- what is due when (pure) -----------------------------------------------------------------


BERLIN = ZoneInfo("Europe/Berlin")


def _at(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


ADD = App("sqlite:///unused.db").task(basic.add)


def _every(seconds: float, missed: str = "late") -> Entry:
    return make_entry(ADD, every=seconds, cron=None, tz=None, name=None, missed=missed)


def _cron(expression: str, missed: str = "late") -> Entry:
    return make_entry(ADD, every=None, cron=expression, tz="Europe/Berlin", name=None,
                      missed=missed)


def _local(moment: float) -> str:
    return datetime.fromtimestamp(moment, BERLIN).isoformat()


def test_cron_on_weekdays_skips_the_weekend_in_its_time_zone_across_a_dst_change() -> None:
    entry = _cron("0 7 * * mon-fri")
    friday = _at("2026-03-27T07:00:00+01:00")  # Berlin's clocks go forward on Sunday the 29th
    assert _local(entry.next_after(friday)) == "2026-03-30T07:00:00+02:00"
    assert _local(entry.next_after(_at("2026-03-30T07:00:00+02:00"))) == \
        "2026-03-31T07:00:00+02:00"


def test_cron_across_dst_changes_in_berlin() -> None:
    """A daily 02:30: on the night that skips 02:00-03:00 it fires at 03:00; on the night
    that repeats 02:00-03:00 it fires once. An hourly one fires in both copies of 02:00."""
    daily = _cron("30 2 * * *")
    assert _local(daily.next_after(_at("2026-03-28T02:30:00+01:00"))) == \
        "2026-03-29T03:00:00+02:00"
    assert _local(daily.next_after(_at("2026-03-29T03:00:00+02:00"))) == \
        "2026-03-30T02:30:00+02:00"
    first = daily.next_after(_at("2026-10-24T02:30:00+02:00"))
    assert _local(first) == "2026-10-25T02:30:00+02:00"
    assert _local(daily.next_after(first)) == "2026-10-26T02:30:00+01:00"
    hourly = _cron("0 * * * *")
    moments = [_at("2026-10-25T01:00:00+02:00")]
    for _ in range(3):
        moments.append(hourly.next_after(moments[-1]))
    assert [_local(m) for m in moments[1:]] == [
        "2026-10-25T02:00:00+02:00", "2026-10-25T02:00:00+01:00", "2026-10-25T03:00:00+01:00"]


def test_a_due_time_reached_within_the_grace_fires_and_a_later_one_is_missed() -> None:
    entry, skip = _every(10), _every(10, "skip")
    assert plan(entry, 100.0, 109.9).fire == ()
    assert plan(entry, 100.0, 110.0).fire == (110.0,)
    assert plan(entry, 100.0, 111.5).fire == (110.0,)  # a standby taking over: late, fired
    late = plan(entry, 100.0, 135.0)  # 110, 120, 130 passed, the first long ago
    assert (late.fire, late.record, late.missed, late.first_missed, late.last_missed) == \
        ((130.0,), None, 3, 110.0, 130.0)
    skipped = plan(skip, 100.0, 135.0)
    assert (skipped.fire, skipped.record, skipped.missed) == ((), 130.0, 3)
    # each due time reached within the grace fires, whatever the policy:
    assert plan(_every(0.5, "skip"), 100.0, 101.6).fire == (100.5, 101.0, 101.5)
    week = plan(_cron("0 7 * * mon-fri"), _at("2026-03-30T07:00:00+02:00"),
                _at("2026-04-02T12:00:00+02:00"))  # Monday's fired; Tuesday to Thursday not
    assert week.missed == 3 and [_local(d) for d in week.fire] == ["2026-04-02T07:00:00+02:00"]


def test_fire_ids_are_uuids_named_by_schedule_entry_and_due_time() -> None:
    one = fire_id("default", "report", 1_700_000_000.25)
    assert one == fire_id("default", "report", 1_700_000_000.25)
    assert len({one, fire_id("other", "report", 1_700_000_000.25),
                fire_id("default", "digest", 1_700_000_000.25),
                fire_id("default", "report", 1_700_000_000.5)}) == 4
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
                        one)


# -- app.schedule() arguments ----------------------------------------------------------------------


@pytest.fixture
def app() -> App:
    app = App("sqlite:///unused.db")
    app.task(basic.add)
    return app


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"every": 0}, r"every=0\): every must be a number of seconds > 0"),
    ({"every": -1}, "every must be a number of seconds > 0"),
    ({"every": "5"}, "every must be a number of seconds > 0"),
    ({"every": True}, "every must be a number of seconds > 0"),
    ({"every": float("nan")}, "every must be a number of seconds > 0"),
    ({}, "exactly one of every=SECONDS or cron="),
    ({"every": 5, "cron": "* * * * *"}, "exactly one of every=SECONDS or cron="),
    ({"cron": "61 * * * *"}, r"cron='61 \* \* \* \*'\): not a cron expression \(Bad minute\)"),
    ({"cron": "0 7 * *"}, "not a cron expression"),
    ({"cron": "0 7 * * mon-fri", "tz": "Mars/Olympus"}, "tz='Mars/Olympus'.*not a time zone"),
    ({"every": 5, "tz": "Europe/Berlin"}, "a time zone applies to cron= schedules"),
    ({"every": 5, "missed": "never"}, "missed must be 'late'"),
    ({"every": 5, "name": ""}, "name must be a non-empty string"),
])
def test_bad_schedule_arguments_are_a_one_line_configuration_error(
        app: App, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(taskq.ConfigurationError, match=message) as caught:
        app.schedule(app.tasks["tests.apps.basic.add"].s(1, 2), **kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(caught.value)
    assert app.schedule_entries == {}


def test_two_entries_with_one_name_are_an_error_and_a_name_tells_them_apart(app: App) -> None:
    add = app.tasks["tests.apps.basic.add"]
    assert app.schedule(add.s(1, 2), every=60).name == "tests.apps.basic.add"
    with pytest.raises(taskq.ConfigurationError,
                       match="two periodic tasks are named 'tests.apps.basic.add'"):
        app.schedule(add.s(3, 4), every=30)
    app.schedule(add.s(3, 4), every=30, name="add-more")
    assert sorted(app.schedule_entries) == ["add-more", "tests.apps.basic.add"]


def test_only_a_signature_can_be_scheduled(app: App) -> None:
    with pytest.raises(taskq.ConfigurationError, match="takes a signature"):
        app.schedule("tests.apps.basic.add", every=60)
    with pytest.raises(taskq.EncodeError):
        app.schedule(app.tasks["tests.apps.basic.add"].s(object(), 1), every=60)


def test_cron_without_the_cron_extra_says_how_to_install_it(
        app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cronsim", None)  # import cronsim now raises ImportError
    with pytest.raises(taskq.ConfigurationError) as caught:
        app.schedule(app.tasks["tests.apps.basic.add"].s(1, 2), cron="0 7 * * mon-fri")
    assert str(caught.value) == CRON_EXTRA == \
        "cron schedules need the cron extra: pip install 'taskq[cron]'"
