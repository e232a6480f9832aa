"""The package as a user installs it: typed, linted, two runtime dependencies, a console script."""

from __future__ import annotations

import importlib.resources
import subprocess
import sys
from pathlib import Path

import pytest

import taskq

from .support import ROOT, run_taskq


def test_py_typed_marker_is_shipped() -> None:
    assert importlib.resources.files("taskq").joinpath("py.typed").is_file()


def test_runtime_dependencies_are_only_kombu_with_a_pinned_amqp_and_click() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = sorted(dep.split(">")[0].split("<")[0].split("=")[0].strip()
                   for dep in project["dependencies"])
    assert names == ["amqp", "click", "kombu"]  # amqp: kombu's own, pinned (see compat.py)
    assert project["requires-python"] == ">=3.10"
    from taskq.broker.amqp import compat

    assert f'"{compat.PIN}"' in (ROOT / "pyproject.toml").read_text()


def test_a_py_amqp_without_the_internals_taskq_drives_is_refused_at_import(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """If py-amqp's internals are not what taskq's hot paths expect, importing taskq's AMQP
    broker fails with one message naming what is missing and the versions to install."""
    import amqp.serialization

    from taskq.broker.amqp import compat

    assert compat.problems() == []
    monkeypatch.delattr(amqp.serialization, "_read_item")
    monkeypatch.setattr(amqp.Connection, "__init__", lambda self, host: None)
    assert compat.problems() == ["amqp.serialization._read_item(buf, offset)",
                                 "amqp.Connection(frame_handler=...)"]
    with pytest.raises(ImportError, match=r"pip install 'amqp>=5\.1\.1,<5\.5'"):
        compat.check()


def test_taskq_never_imports_celery() -> None:
    """Celery is a test partner only: importing all of taskq must not pull it in."""
    code = ("import sys, taskq, taskq.cli, taskq.worker, taskq.worker.executor; "
            "sys.exit(1 if any(m.split('.')[0] == 'celery' for m in sys.modules)"
            " else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_console_script_reports_the_version() -> None:
    result = run_taskq("--version")
    assert result.returncode == 0
    assert taskq.__version__ in result.stdout


def test_ruff_is_clean() -> None:
    paths = [p for p in ("taskq", "tests", "examples", "benchmarks") if (ROOT / p).is_dir()]
    result = subprocess.run([sys.executable, "-m", "ruff", "check", *paths], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean() -> None:
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


TYPED_USAGE = '''
from typing import assert_type
from taskq import App, AsyncResult

app = App()

@app.task
def add(x: int, y: int) -> int:
    return x + y

@app.task(name="greet", queue="q")
def greet(name: str) -> str:
    return "hi " + name

@app.task(bind=True, max_retries=2)
def bound(self: object, n: int) -> float:
    return n / 2

assert_type(add(2, 3), int)
assert_type(add.delay(2, 3), AsyncResult[int])
assert_type(add.delay(2, 3).get(timeout=1), int)
assert_type(greet.delay("x"), AsyncResult[str])
assert_type(bound.delay(4), AsyncResult[float])
add.delay("two", 3)  # E: wrong argument type
'''


def test_tasks_keep_their_signature_for_type_checkers(tmp_path: Path) -> None:
    """``@app.task`` keeps the function's signature: delay() type-checks, returns AsyncResult[R]."""
    sample = tmp_path / "usage.py"
    sample.write_text(TYPED_USAGE)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--python-version", "3.11", str(sample)],
        cwd=ROOT, capture_output=True, text=True,
    )
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    # Exactly one error: the deliberate wrong argument type on the last line.
    assert len(errors) == 1, result.stdout
    assert "usage.py:24" in errors[0] and "arg-type" in errors[0], result.stdout


def test_the_embedded_broker_never_loads_kombu_or_amqp(tmp_path: Path) -> None:
    """A client and a worker slot on sqlite:// import neither kombu nor py-amqp (they cost
    every process ~50 ms and ~15 MiB): only the AMQP broker's package needs them."""
    code = (
        "import sys, taskq, taskq.cli, taskq.worker.slot\n"
        f"app = taskq.App('sqlite:///{tmp_path}/q.db')\n"
        "add = app.task(name='add')(lambda x, y: x + y)\n"
        "add.delay(1, 2); app.close()\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('kombu', 'amqp'))\n"
        "sys.exit(f'loaded: {loaded}' if loaded else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
