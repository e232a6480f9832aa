"""Defining tasks: decorators, names, local calls, arguments checked before sending."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

import taskq
from taskq import App, ConfigurationError, EncodeError

from .apps import basic
from .support import Broker, WorkerProcess


def test_bare_and_configured_decorators_register_tasks() -> None:
    app = App("amqp://guest:guest@localhost//")

    @app.task
    def plain(x: int) -> int:
        return x

    @app.task(name="custom.name", queue="elsewhere")
    def named(x: int) -> int:
        return x

    qualname = "test_bare_and_configured_decorators_register_tasks.<locals>.plain"
    assert plain.name == f"tests.test_app.{qualname}"
    assert named.name == "custom.name" and named.options.queue == "elsewhere"
    assert set(app.tasks) == {plain.name, "custom.name"}


def test_default_name_is_module_and_qualname(tasks: SimpleNamespace) -> None:
    assert tasks.add.name == "tests.apps.basic.add"


def test_a_task_still_runs_locally_and_keeps_its_signature(tasks: SimpleNamespace) -> None:
    assert tasks.add(2, 3) == 5
    assert inspect.signature(tasks.add) == inspect.signature(basic.add)
    assert tasks.add.__name__ == "add" and tasks.add.__doc__ == basic.add.__doc__


def test_wrong_arguments_raise_before_anything_is_sent(tasks: SimpleNamespace, broker: Broker,
                                                       queue: str) -> None:
    with pytest.raises(TypeError, match="missing a required argument: 'y'"):
        tasks.add.delay(1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'z'"):
        tasks.add.delay(1, 2, z=3)
    assert not broker.exists(queue)


def test_an_argument_json_cannot_carry_raises_and_nothing_is_sent(tasks: SimpleNamespace,
                                                                  broker: Broker,
                                                                  queue: str) -> None:
    with pytest.raises(EncodeError, match=r"tests.apps.basic.echo.*not JSON serializable"):
        tasks.echo.delay({1, 2, 3})
    assert isinstance(EncodeError("x"), TypeError)
    assert not broker.exists(queue)


def test_unknown_settings_are_named() -> None:
    with pytest.raises(ConfigurationError, match=r"unknown setting.*serialiser.*known settings"):
        App(serialiser="json")


def test_pickle_needs_an_explicit_opt_in() -> None:
    with pytest.raises(ConfigurationError, match="not in accept"):
        App(serializer="pickle")
    app = App(serializer="pickle", accept=("json", "pickle"))
    assert app.config.accept == ("json", "pickle")


def test_broker_url_comes_from_argument_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKQ_BROKER_URL", "amqp://u:secret@from-env:5672/v")
    assert App().config.broker_url == "amqp://u:secret@from-env:5672/v"
    assert App("amqp://x@arg//").config.broker_url == "amqp://x@arg//"
    assert App().config.display_url == "amqp://u:****@from-env:5672/v"
    monkeypatch.delenv("TASKQ_BROKER_URL")
    assert App().config.broker_url == "sqlite:///taskq.db"  # the embedded broker


def test_module_level_task_decorator_uses_a_default_app_from_the_environment(
        broker: Broker) -> None:
    code = textwrap.dedent("""
        import taskq
        @taskq.task
        def double(x):
            return 2 * x
        app = taskq.default_app()
        assert app.tasks[double.name] is double
        print(app.config.broker_url, double.name, double(4))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"TASKQ_BROKER_URL": broker.url, "PATH": "/usr/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [broker.url, "__main__.double", "8"]


SCRIPT = '''
import sys
from taskq import App

app = App(default_queue=sys.argv[1] if len(sys.argv) > 1 else "taskq")

@app.task
def shout(word):
    return word.upper() + "!"

if __name__ == "__main__":
    print(shout.name, shout.delay("hello").get(timeout=20))
'''


def test_tasks_defined_in_a_script_run_as_main_reach_a_worker(broker: Broker, queue: str,
                                                              tmp_path: Path) -> None:
    """Given a script run as ``python myjobs.py``, its tasks are named ``myjobs.*`` — the names
    a worker started with ``-A myjobs:app`` gives them — so the worker runs them."""
    (tmp_path / "myjobs.py").write_text(SCRIPT)
    worker = WorkerProcess(broker, "myjobs:app", [queue], tmp_path / "worker.log", cwd=tmp_path)
    try:
        worker.wait_ready()
        out = subprocess.run([sys.executable, "myjobs.py", queue], cwd=tmp_path,
                             capture_output=True, text=True, timeout=60,
                             env={"TASKQ_BROKER_URL": broker.url, "PATH": "/usr/bin"})
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["myjobs.shout", "HELLO!"]
    finally:
        worker.stop()


def test_delay_returns_an_async_result(tasks: SimpleNamespace,
                                       start_worker: Callable[..., WorkerProcess]) -> None:
    start_worker()
    result = tasks.add.delay(2, 3)
    assert isinstance(result, taskq.AsyncResult)
    assert result.get(timeout=10) == 5
    assert tasks.add.apply_async((4, 5)).get(timeout=10) == 9
    assert tasks.add.apply_async(kwargs={"x": 1, "y": 1}).get(timeout=10) == 2
