"""Fixtures: the brokers under test, a queue per test, real worker processes.

Tests of the contract run on both brokers (parametrized ``[sqlite]`` and ``[rabbitmq]``): the
embedded one in a file of the session's own, and the local RabbitMQ in a vhost of the
session's own. A test or module marked ``rabbitmq`` is about RabbitMQ itself and runs on it
only. Without a reachable RabbitMQ those are skipped, with one line at the end saying why and
how to run them; with ``CI=true`` they fail instead (CI must run them).
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from taskq import App

from .apps import basic
from .support import (
    RABBIT_HOST,
    RABBIT_PORT,
    Broker,
    RabbitBroker,
    SqliteBroker,
    WorkerProcess,
    rabbitmqctl,
    unique,
    wait_for,
)
from .tls_broker import TlsBroker, tls_broker

KINDS = ("sqlite", "rabbitmq")
NO_RABBIT = "RabbitMQ is not reachable"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "rabbitmq: about RabbitMQ itself: runs on it only")
    config.addinivalue_line("markers", "embedded: about the embedded broker: runs on it only")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "broker_kind" in metafunc.fixturenames:
        if metafunc.definition.get_closest_marker("rabbitmq") is not None:
            kinds = ["rabbitmq"]
        elif metafunc.definition.get_closest_marker("embedded") is not None:
            kinds = ["sqlite"]
        else:
            kinds = list(KINDS)
        metafunc.parametrize("broker_kind", kinds, scope="session")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A case marked ``rabbitmq`` through its parameters (not its function) has no
    embedded-broker variant: leave that one out."""
    def applies(item: pytest.Item) -> bool:
        callspec = getattr(item, "callspec", None)
        kind = callspec.params.get("broker_kind") if callspec is not None else None
        return not (kind == "sqlite" and item.get_closest_marker("rabbitmq") is not None)

    items[:] = [item for item in items if applies(item)]


def rabbit_missing() -> str | None:
    """Why RabbitMQ tests can't run here, or None."""
    if shutil.which("rabbitmqctl") is None:
        return f"{NO_RABBIT} (no rabbitmqctl on PATH)"
    try:
        socket.create_connection((RABBIT_HOST, RABBIT_PORT), timeout=2).close()
    except OSError as exc:
        return f"{NO_RABBIT} on {RABBIT_HOST}:{RABBIT_PORT} ({exc})"
    return None


def need_rabbit() -> None:
    """Skip a RabbitMQ test where there is none, fail it in CI."""
    why = rabbit_missing()
    if why is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why}: CI must run the RabbitMQ tests")
    pytest.skip(why)


@pytest.fixture(scope="session")
def rabbit_session() -> Iterator[RabbitBroker]:
    """A fresh vhost for this test run, deleted afterwards."""
    need_rabbit()
    vhost = unique("taskq-test")
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    try:
        yield RabbitBroker(vhost)
    finally:
        rabbitmqctl("delete_vhost", vhost, check=False)


@pytest.fixture(scope="session")
def sqlite_session(tmp_path_factory: pytest.TempPathFactory) -> SqliteBroker:
    """The embedded broker's file for this test run."""
    return SqliteBroker(tmp_path_factory.mktemp("embedded") / "taskq.db")


@pytest.fixture
def broker(broker_kind: str, request: pytest.FixtureRequest,
           monkeypatch: pytest.MonkeyPatch) -> Broker:
    """The broker under test (its URL also in $TASKQ_BROKER_URL for the test's duration)."""
    name = "rabbit_session" if broker_kind == "rabbitmq" else "sqlite_session"
    chosen: Broker = request.getfixturevalue(name)
    monkeypatch.setenv("TASKQ_BROKER_URL", chosen.url)
    return chosen


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = [r for r in terminalreporter.stats.get("skipped", [])
               if NO_RABBIT in str(getattr(r, "longrepr", ""))]
    if skipped:
        terminalreporter.write_line(
            f"{len(skipped)} RabbitMQ tests skipped: {NO_RABBIT} here. To run them too, start "
            "one on localhost:5672 (guest/guest), e.g. docker compose up -d rabbitmq, and run "
            "the tests again."
        )


@pytest.fixture
def queue(request: pytest.FixtureRequest) -> str:
    """A queue name no other test uses."""
    return unique(request.node.name.replace("[", "-").replace("]", "")[:40])


@pytest.fixture
def make_app(broker: Broker, queue: str) -> Iterator[Callable[..., App]]:
    """Build client Apps on the test's vhost and queue; all are closed after the test."""
    apps: list[App] = []

    def make(**settings: object) -> App:
        settings.setdefault("default_queue", queue)
        app = App(broker.url, **settings)  # type: ignore[arg-type]
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


@pytest.fixture
def tasks(make_app: Callable[..., App]) -> SimpleNamespace:
    """The basic test tasks, registered on a client App that sends to this test's queue."""
    return basic.build(make_app())


@pytest.fixture
def start_worker(
    broker: Broker, queue: str, tmp_path: Path
) -> Iterator[Callable[..., WorkerProcess]]:
    """Start real ``taskq worker`` processes; each is stopped (and reaped) after the test."""
    workers: list[WorkerProcess] = []

    def start(*args: str, app: str = "tests.apps.basic:app", queues: list[str] | None = None,
              concurrency: int = 2, ready: bool = True, env: dict[str, str] | None = None
              ) -> WorkerProcess:
        log_path = tmp_path / f"worker-{len(workers) + 1}.log"
        # One machine per test: workers started by one test share a state directory.
        env = {"TASKQ_STATE_DIR": str(tmp_path / "worker-state"), **(env or {})}
        worker = WorkerProcess(broker, app, queues or [queue], log_path, *args,
                               concurrency=concurrency, env=env)
        workers.append(worker)
        return worker.wait_ready() if ready else worker

    yield start
    for worker in workers:
        worker.stop()


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    """A throwaway RabbitMQ node with TLS listeners and its own certificate authority."""
    need_rabbit()
    with tls_broker(tmp_path_factory.mktemp("tls-broker")) as node:
        yield node


@pytest.fixture
def memory_alarm(broker: Broker) -> Iterator[Callable[[bool], None]]:
    """Switch RabbitMQ's memory alarm on and off (a tiny high watermark); always off after."""

    def alarm(on: bool) -> None:
        rabbitmqctl("set_vm_memory_high_watermark", "0.0001" if on else "0.4")
        wait_for(lambda: ("resource_limit" in rabbitmqctl("eval", "rabbit_alarm:get_alarms().")
                          ) == on, 20, f"the memory alarm to be {'on' if on else 'off'}")

    try:
        yield alarm
    finally:
        alarm(False)
