"""Workflows: signatures, chain, group and chord on real workers, both brokers; a kill -9 at
any point neither loses nor repeats a chain's next step or a chord's callback."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

import taskq
from taskq import App, ChordError, ConfigurationError, chain, chord, group, signature

from .apps import flows
from .chaos import slot_pids
from .support import Broker, WorkerProcess, wait_for

FLOWS = "tests.apps.flows:app"


def _quiet(broker: Broker, queue: str) -> None:
    """Wait until ``queue`` has nothing ready and nothing held: every copy of every message
    sent to it has run (or been let go), so what the tasks noted is final."""
    def quiet() -> bool:
        info = broker.queue_info(queue)
        return info["messages_ready"] == "0" and info["messages_unacknowledged"] == "0"
    wait_for(quiet, 30, f"{queue} to have nothing ready or held")


def _notes(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _runs(path: Path) -> Counter[str]:
    """How many times each token (a step, a part) was noted."""
    return Counter(line.rsplit(" ", 1)[0] for line in _notes(path))


@pytest.fixture
def flow(make_app: Callable[..., App]) -> SimpleNamespace:
    return flows.build(make_app())


# -- signatures (pure) ---------------------------------------------------------------------------


def test_a_signature_is_celerys_dict_and_survives_json() -> None:
    """Given add.s(2, 2) with options, its JSON is Celery's form, and signature() of that
    JSON gives the same call back; .si() is immutable; an unknown option is a clear error."""
    app = App("sqlite:///unused.db")
    tasks = flows.build(app)
    sig = tasks.add.s(2, 2).set(queue="math", countdown=1)
    wire = json.loads(json.dumps(sig))
    assert wire == {"task": "tests.apps.basic.add", "args": [2, 2], "kwargs": {},
                    "options": {"queue": "math", "countdown": 1}, "subtask_type": None,
                    "immutable": False, "chord_size": None}
    back = signature(wire, app=app)
    assert (back.name, back.args, back.options) == (sig.name, (2, 2), sig.options)
    assert tasks.add.si(1, 1).immutable and tasks.add.si(1, 1).clone((5,)).args == (1, 1)
    assert tasks.add.s(1).clone((5,)).args == (5, 1)  # partial: the previous result first
    assert back() == 4  # called here, like the function
    with pytest.raises(ConfigurationError, match="unknown signature option.*quue"):
        tasks.add.s(1, 1).set(quue="x")
    pipeline = tasks.add.s(1, 1) | tasks.add.s(2) | tasks.add.s(3)
    assert isinstance(pipeline, taskq.Chain) and len(pipeline.steps()) == 3
    assert isinstance(signature(json.loads(json.dumps(pipeline)), app=app), taskq.Chain)
    with pytest.raises(ConfigurationError, match="a chain's steps are task signatures"):
        chain(tasks.add.s(1, 1), group(tasks.add.s(1, 1))).steps()


def test_eager_workflows_run_in_the_caller() -> None:
    app = App("sqlite:///unused.db", eager=True)
    tasks = flows.build(app)
    assert (tasks.add.s(1, 1) | tasks.add.s(2) | tasks.add.si(10, 10)).delay().get() == 20
    assert group(tasks.add.s(i, i) for i in range(4)).delay().get() == [0, 2, 4, 6]
    assert chord([tasks.add.s(i, 1) for i in range(3)], tasks.tsum.s()).delay().get() == 6


# -- chain -----------------------------------------------------------------------------------


def test_a_chain_passes_each_result_on_and_the_caller_gets_the_last(
        flow: SimpleNamespace, start_worker: Callable[..., WorkerProcess], tmp_path: Path,
        broker: Broker, queue: str) -> None:
    start_worker(app=FLOWS)
    log = tmp_path / "steps"
    result = (flow.step.s(0, str(log), "a") | flow.step.s(str(log), "b")
              | flow.step.s(str(log), "c") | flow.add.si(40, 2)).delay()
    assert result.get(timeout=20) == 42
    assert _runs(log) == {"a": 1, "b": 1, "c": 1}
    assert broker.counts(queue)[0] == 0 and broker.dead_letter_count(queue) == 0


def test_a_signature_sent_as_an_argument_can_be_sent_by_the_task(
        flow: SimpleNamespace, start_worker: Callable[..., WorkerProcess], tmp_path: Path,
        queue: str) -> None:
    start_worker(app=FLOWS)
    log = tmp_path / "steps"
    inner = flow.step.s(1, str(log), "inner").set(queue=queue)  # the worker's app sends it
    sent_id = flow.resend.delay(None, inner).get(timeout=20)
    wait_for(lambda: _runs(log)["inner"] == 1, 20, "the signature sent by the task to run")
    assert isinstance(sent_id, str) and sent_id


def test_a_failed_step_fails_the_chain_at_once_naming_the_step(
        flow: SimpleNamespace, start_worker: Callable[..., WorkerProcess], tmp_path: Path,
        broker: Broker, queue: str) -> None:
    start_worker(app=FLOWS)
    log = tmp_path / "steps"
    bad = flow.boom.s("no good")
    result = (flow.step.s(0, str(log), "a") | bad | flow.step.s(str(log), "c")).delay()
    with pytest.raises(ValueError, match="no good") as caught:
        result.get(timeout=20)
    assert any("chain step tests.apps.flows.boom[" in note for note in caught.value.__notes__)
    assert _runs(log) == {"a": 1}  # the step after the failure never ran
    assert broker.counts(queue)[0] == 0


def test_chain_steps_may_go_to_other_queues(
        flow: SimpleNamespace, start_worker: Callable[..., WorkerProcess], tmp_path: Path,
        queue: str) -> None:
    other = f"{queue}-other"
    start_worker(app=FLOWS, queues=[queue, other])
    log = tmp_path / "steps"
    result = (flow.step.s(0, str(log), "a")
              | flow.step.s(str(log), "b").set(queue=other)
              | flow.step.s(str(log), "c")).delay()
    assert result.get(timeout=20) == 3


def test_a_step_killed_mid_run_runs_again_and_the_chain_goes_on_once(
        flow: SimpleNamespace, start_worker: Callable[..., WorkerProcess], tmp_path: Path,
        broker: Broker, queue: str) -> None:
    """Given a chain whose middle step is running, when its slot is killed with kill -9,
    then that step runs again and every later step runs exactly once."""
    worker = start_worker(app=FLOWS)
    log = tmp_path / "steps"
    release = tmp_path / "release"
    result = (flow.step.s(0, str(log), "a") | flow.step.s(str(log), "b", 0, str(release))
              | flow.step.s(str(log), "c")).delay()
    pid = wait_for(lambda: next((int(line.split()[1]) for line in _notes(log)
                                 if line.startswith("b ")), None), 20, "step b to start")
    assert pid in slot_pids(worker.pid)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: _runs(log)["b"] == 2, 30, "step b to run again")
    release.touch()
    assert result.get(timeout=30) == 3
    runs = _runs(log)
    assert runs["a"] == 1 and runs["b"] == 2 and runs["c"] == 1
    assert broker.counts(queue)[0] == 0 and broker.dead_letter_count(queue) == 0


def test_a_step_killed_after_it_ran_before_its_ack_hands_on_once(
        make_app: Callable[..., App], start_worker: Callable[..., WorkerProcess],
        tmp_path: Path, broker: Broker, queue: str) -> None:
    """Given a step whose slot is killed (kill -9) after the step ran and before its message
    was settled, then the step runs again and the next step still runs once."""
    die = tmp_path / "die"
    die.mkdir()
    start_worker(app=FLOWS, env={"TASKQ_TEST_DIE_DIR": str(die)})
    flow = flows.build(make_app())
    log = tmp_path / "steps"
    b = flow.step.s(str(log), "b").set(task_id="step-b-" + queue)
    (die / b.id).touch()
    result = (flow.step.s(0, str(log), "a") | b | flow.step.s(str(log), "c")).delay()
    assert result.get(timeout=30) == 3
    assert not (die / b.id).exists()  # the kill happened
    assert _runs(log) == {"a": 1, "b": 2, "c": 1}
    assert broker.counts(queue)[0] == 0


def test_a_chain_sent_twice_under_the_same_ids_runs_each_later_step_once(
        make_app: Callable[..., App], start_worker: Callable[..., WorkerProcess],
        tmp_path: Path, broker: Broker, queue: str) -> None:
    """Given the first step of a chain delivered twice (as after a kill -9 of its worker
    between storing the next step and its ack, or a client that sent it again), then it runs
    twice, each run stores the next step, and the next steps run once each."""
    start_worker(app=FLOWS)
    log = tmp_path / "steps"
    ids = {name: f"{name}-{queue}" for name in "abc"}

    def send(app: App) -> taskq.AsyncResult[int]:
        flow = flows.build(app)
        return (flow.step.s(0, str(log), "a").set(task_id=ids["a"])
                | flow.step.s(str(log), "b", 0.3).set(task_id=ids["b"])
                | flow.step.s(str(log), "c").set(task_id=ids["c"])).delay()

    first, _ = send(make_app()), send(make_app())
    assert first.get(timeout=30) == 3
    wait_for(lambda: _runs(log)["a"] == 2, 20, "the second copy of step a to run")
    _quiet(broker, queue)  # a second copy of b, if stored, would be ready, held or noted
    assert _runs(log) == {"a": 2, "b": 1, "c": 1}
    assert broker.counts(queue)[0] == 0 and broker.dead_letter_count(queue) == 0


# -- group -----------------------------------------------------------------------------------


def test_a_group_of_a_hundred_returns_results_in_order(
        flow: SimpleNamespace, start_worker: Callable[..., WorkerProcess], broker: Broker,
        queue: str) -> None:
    start_worker(app=FLOWS)
    result = group(flow.add.s(i, i) for i in range(100)).delay()
    assert isinstance(result, taskq.GroupResult) and len(result) == 100
    assert result.get(timeout=30) == [2 * i for i in range(100)]
    assert result.ready() and result.successful() and result.completed_count() == 100
    assert [r.get() for r in result] == [r.get() for r in result.results]
    failing = group([flow.add.s(1, 1), flow.boom.s(None, "bad member")]).delay()
    with pytest.raises(ValueError, match="bad member"):
        failing.get(timeout=20)
    values = failing.get(timeout=20, propagate=False)
    assert values[0] == 2 and isinstance(values[1], ValueError)
    assert failing.failed() and failing.completed_count() == 1
    assert broker.counts(queue)[0] == 0


# -- chord -----------------------------------------------------------------------------------


def test_a_chord_calls_back_once_with_every_result_in_order(
        flow: SimpleNamespace, start_worker: Callable[..., WorkerProcess], tmp_path: Path,
        broker: Broker, queue: str) -> None:
    start_worker(app=FLOWS)
    log = tmp_path / "parts"
    result = chord([flow.part.s(i, str(log)) for i in range(20)], flow.join.s(str(log))).delay()
    assert result.get(timeout=30) == [10 * i for i in range(20)]
    assert _notes(log).count("callback " + json.dumps([10 * i for i in range(20)])) == 1
    assert chord([], flow.tsum.s()).delay().get(timeout=20) == 0
    assert chord(group(flow.add.s(i, 1) for i in range(3)))(flow.tsum.s()).get(timeout=20) == 6
    assert broker.counts(queue)[0] == 0 and broker.dead_letter_count(queue) == 0


def test_a_failed_header_task_gives_the_caller_a_chord_error_and_no_callback(
        flow: SimpleNamespace, start_worker: Callable[..., WorkerProcess], tmp_path: Path,
        broker: Broker, queue: str) -> None:
    start_worker(app=FLOWS)
    log = tmp_path / "parts"
    bad = flow.boom.s(None, "header broke").set(task_id="bad-header")
    result = chord([flow.part.s(0, str(log)), bad, flow.part.s(2, str(log))],
                   flow.join.s(str(log))).delay()
    with pytest.raises(ChordError, match=r"tests.apps.flows.boom\[bad-header\] failed: "
                                         r"ValueError: header broke"):
        result.get(timeout=20)
    wait_for(lambda: len(_notes(log)) == 2, 20, "the other header tasks to run")
    _quiet(broker, queue)
    assert not any(line.startswith("callback") for line in _notes(log))


def test_a_chord_completes_after_its_caller_exited(
        broker: Broker, queue: str, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    """Given a client that sends a chord and exits at once, then the callback still runs,
    once, when the header is done (the join lives in the broker)."""
    log = tmp_path / "parts"
    script = (
        "import sys; from taskq import App, chord; from tests.apps import flows; "
        f"app = App({broker.url!r}, default_queue={queue!r}); t = flows.build(app); "
        f"chord([t.part.s(i, {str(log)!r}, 0.05) for i in range(5)], t.join.s({str(log)!r}))"
        ".delay(); app.close()"
    )
    import subprocess
    import sys

    from .support import ROOT
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=60)
    start_worker(app=FLOWS)
    wait_for(lambda: any(line.startswith("callback") for line in _notes(log)), 30,
             "the callback to run")
    _quiet(broker, queue)
    assert [line for line in _notes(log) if line.startswith("callback")] == [
        "callback " + json.dumps([0, 10, 20, 30, 40])]


def test_a_header_task_killed_after_it_ran_before_its_ack_still_calls_back_once(
        make_app: Callable[..., App], start_worker: Callable[..., WorkerProcess],
        tmp_path: Path, broker: Broker, queue: str) -> None:
    die = tmp_path / "die"
    die.mkdir()
    start_worker(app=FLOWS, env={"TASKQ_TEST_DIE_DIR": str(die)})
    flow = flows.build(make_app())
    log = tmp_path / "parts"
    header = [flow.part.s(i, str(log)).set(task_id=f"part-{i}-{queue}") for i in range(4)]
    for sig in header:  # every header task's slot dies once, after the task, before its ack
        (die / sig.id).touch()
    result = chord(header, flow.join.s(str(log))).delay()
    assert result.get(timeout=60) == [0, 10, 20, 30]
    assert not list(die.iterdir())
    runs = _runs(log)
    assert all(runs[f"part {i}"] == 2 for i in range(4)), runs
    _quiet(broker, queue)
    assert sum(1 for line in _notes(log) if line.startswith("callback")) == 1
    assert broker.counts(queue)[0] == 0 and broker.dead_letter_count(queue) == 0


def test_a_chord_sent_twice_under_the_same_ids_calls_back_once(
        make_app: Callable[..., App], start_worker: Callable[..., WorkerProcess],
        tmp_path: Path, broker: Broker, queue: str) -> None:
    """Given every header task delivered twice (each run adds its part again), then the
    callback still runs once, whether the copies come before or after the chord completed."""
    start_worker(app=FLOWS)
    log = tmp_path / "parts"

    def send(app: App) -> taskq.AsyncResult[list[int]]:
        flow = flows.build(app)
        header = [flow.part.s(i, str(log)).set(task_id=f"p{i}-{queue}") for i in range(5)]
        return chord(header, flow.join.s(str(log)).set(task_id=f"cb-{queue}")).delay()

    first = send(make_app())
    assert first.get(timeout=30) == [0, 10, 20, 30, 40]
    send(make_app())
    wait_for(lambda: sum(runs for token, runs in _runs(log).items()
                         if token.startswith("part")) == 10, 20, "the copies to run")
    _quiet(broker, queue)
    assert sum(1 for line in _notes(log) if line.startswith("callback")) == 1
    assert broker.counts(queue)[0] == 0 and broker.dead_letter_count(queue) == 0


def test_chords_under_random_kill_9_of_slots_call_back_exactly_once(
        make_app: Callable[..., App], start_worker: Callable[..., WorkerProcess],
        tmp_path: Path, broker: Broker, queue: str) -> None:
    """Given 12 chords of 6 header tasks on a worker whose slot processes are killed with
    kill -9 at random moments, then every chord's callback is stored once: it runs once, with
    every result in order (again only if the slot running it was killed: at least once), and
    every caller gets it."""
    worker = start_worker(app=FLOWS, concurrency=2)
    flow = flows.build(make_app())
    logs = [tmp_path / f"chord-{n}" for n in range(12)]
    results = [chord([flow.part.s(i, str(log), random.uniform(0.0, 0.03)) for i in range(6)],
                     flow.join.s(str(log))).delay() for log in logs]
    stop = threading.Event()
    kills = []

    def killer() -> None:
        rng = random.Random(7)
        while not stop.wait(rng.uniform(0.05, 0.3)):
            pids = slot_pids(worker.pid)
            if pids:
                pid = rng.choice(pids)
                try:
                    os.kill(pid, signal.SIGKILL)
                    kills.append(pid)
                except ProcessLookupError:
                    pass

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(kills) >= 8, 30, "kills")
    finally:
        stop.set()
        thread.join()
    for result in results:
        assert result.get(timeout=60) == [0, 10, 20, 30, 40, 50]
    _quiet(broker, queue)
    for log in logs:
        callbacks = [line for line in _notes(log) if line.startswith("callback")]
        runs = [int(pid) for pid in _notes(Path(f"{log}.pids"))]
        # a run cut short by a kill after its note is run again (at least once); any other
        # second run would be a callback stored twice
        cut_short = [pid for pid in runs[:-1] if pid in kills]
        assert callbacks == ["callback " + json.dumps([0, 10, 20, 30, 40, 50])] * (
            1 + len(cut_short)), (log, callbacks, runs, kills)
        assert len(runs) == len(callbacks) and runs[-1] not in cut_short
    assert broker.counts(queue)[0] == 0


def test_a_chain_step_with_nowhere_to_go_fails_the_chain_and_is_dead_lettered(
        flow: SimpleNamespace, start_worker: Callable[..., WorkerProcess], tmp_path: Path,
        broker: Broker, queue: str) -> None:
    """Given a chain whose next step is sent by a routing key no queue is bound to, then the
    caller gets Unroutable at once, the step that could not hand on is dead-lettered with the
    reason, and the worker goes on serving (no reconnect loop)."""
    worker = start_worker(app=FLOWS)
    log = tmp_path / "steps"
    result = (flow.step.s(0, str(log), "a")
              | flow.step.s(str(log), "b").set(routing_key="nobody.listens.here")).delay()
    with pytest.raises(taskq.Unroutable, match="nobody.listens.here"):
        result.get(timeout=20)
    wait_for(lambda: broker.dead_letter_count(queue) == 1, 20, "the dead letter")
    letters = broker.take_dead_letters(queue)
    assert [letter.exception for letter in letters] == ["Unroutable"]
    assert _runs(log) == {"a": 1}
    assert flow.add.delay(2, 2).get(timeout=20) == 4
    assert "reconnecting" not in worker.log()


def test_link_and_link_error_signatures_are_sent_after_the_task(
        flow: SimpleNamespace, start_worker: Callable[..., WorkerProcess], tmp_path: Path,
        broker: Broker, queue: str) -> None:
    """Celery's link (the result prepended) and link_error (the failed task's id
    prepended), sent by the worker once the task is done."""
    start_worker(app=FLOWS)
    log = tmp_path / "steps"
    ok = flow.step.s(1, str(log), "first")
    ok.link(flow.step.s(str(log), "linked"))
    assert ok.delay().get(timeout=20) == 2
    bad = flow.boom.s(None, "broken").set(task_id=f"bad-{queue}")
    bad.on_error(flow.errback.s(str(log)))
    with pytest.raises(ValueError):
        bad.delay().get(timeout=20)
    wait_for(lambda: f"errback-for-bad-{queue}" in _runs(log), 20, "the errback to run")
    _quiet(broker, queue)
    assert _runs(log) == {"first": 1, "linked": 1, f"errback-for-bad-{queue}": 1}


@pytest.mark.rabbitmq
def test_copies_claiming_one_run_at_once_on_rabbitmq_get_exactly_one(broker: Broker) -> None:
    """The claim protocol itself, under contention: 6 copies of one workflow message (each
    its own mark, its own connection) claim at the same moment; exactly one may run. Then a
    later step of the same chain replaces the claim, and a late copy of the earlier step is
    refused, while the winner's own copy, delivered again, may still run."""
    import amqp

    from taskq.broker.amqp.channel import ConfirmChannel
    from taskq.broker.amqp.flows import ONCE_HEADER, Claims
    from taskq.message import Delivery

    from .support import RABBIT_HOST, RABBIT_PORT

    def connect() -> tuple[amqp.Connection, Claims]:
        connection = amqp.Connection(f"{RABBIT_HOST}:{RABBIT_PORT}", userid="guest",
                                     password="guest", virtual_host=broker.vhost)  # type: ignore[attr-defined]
        connection.connect()
        return connection, Claims(connection, ConfirmChannel(connection), 60)

    def copy(key: str, place: int, mark: str) -> Delivery:
        return Delivery(b"", None, {"id": key, ONCE_HEADER: [key, place, mark]}, key, None,
                        False, "q")

    links = [connect() for _ in range(6)]
    try:
        for round_ in range(5):
            key = f"claim-{round_}-{os.urandom(4).hex()}"
            barrier = threading.Barrier(len(links))
            outcomes: dict[int, bool] = {}

            def claim(n: int, key: str = key, barrier: threading.Barrier = barrier,
                      outcomes: dict[int, bool] = outcomes) -> None:
                claims = links[n][1]
                barrier.wait()
                outcomes[n] = claims.is_copy(copy(key, -2, f"m{n}"), time.monotonic() + 20)

            threads = [threading.Thread(target=claim, args=(n,)) for n in range(len(links))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            winners = [n for n, dropped in outcomes.items() if not dropped]
            assert len(outcomes) == len(links) and len(winners) == 1, outcomes
            claims = links[0][1]
            deadline = time.monotonic() + 20
            winner = winners[0]
            assert not claims.is_copy(copy(key, -2, f"m{winner}"), deadline)  # its own, again
            assert not claims.is_copy(copy(key, -1, "next"), deadline)  # the next step
            assert claims.is_copy(copy(key, -2, f"m{winner}"), deadline)  # too late now
            assert not claims.is_copy(copy(key, -1, "next"), deadline)
    finally:
        for connection, _ in links:
            connection.close()
