"""Fixtures: a RabbitMQ vhost for the session, a queue per test, real worker processes."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from taskq import App

from .apps import basic
from .support import Broker, WorkerProcess, rabbitmqctl, unique, wait_for
from .tls_broker import TlsBroker, tls_broker


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    """A fresh vhost for this test run, deleted afterwards."""
    if shutil.which("rabbitmqctl") is None:
        pytest.exit("rabbitmqctl not found: the tests need a local RabbitMQ", returncode=3)
    vhost = unique("taskq-test")
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    test_broker = Broker(vhost)
    os.environ["TASKQ_BROKER_URL"] = test_broker.url
    try:
        yield test_broker
    finally:
        rabbitmqctl("delete_vhost", vhost, check=False)


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
    with tls_broker(tmp_path_factory.mktemp("tls-broker")) as node:
        yield node


@pytest.fixture
def memory_alarm() -> Iterator[Callable[[bool], None]]:
    """Switch RabbitMQ's memory alarm on and off (a tiny high watermark); always off after."""

    def alarm(on: bool) -> None:
        rabbitmqctl("set_vm_memory_high_watermark", "0.0001" if on else "0.4")
        wait_for(lambda: ("resource_limit" in rabbitmqctl("eval", "rabbit_alarm:get_alarms().")
                          ) == on, 20, f"the memory alarm to be {'on' if on else 'off'}")

    try:
        yield alarm
    finally:
        alarm(False)
