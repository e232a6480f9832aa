"""Bound tasks that retry (``-A tests.apps.retrying:app``)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from taskq import App


def always_fails(self: Any, log: str) -> None:
    """Fail every time, asking for a retry with the error each time."""
    with open(log, "a") as f:
        f.write(f"{self.request.retries}\n")
    try:
        raise ValueError(f"attempt {self.request.retries} failed")
    except ValueError as exc:
        raise self.retry(exc=exc, countdown=0.1) from exc


def retry_forever(self: Any) -> None:
    """Ask for a retry with no error: past max_retries that is MaxRetriesExceededError."""
    raise self.retry(countdown=0.1)


def retry_once_slowly(self: Any, marker: str) -> str:
    with open(marker, "a") as f:
        f.write("attempt\n")
    if self.request.retries == 0:
        raise self.retry(countdown=3)
    return "second attempt"


def build(app: App) -> SimpleNamespace:
    return SimpleNamespace(
        app=app,
        always_fails=app.task(bind=True, max_retries=2)(always_fails),
        retry_forever=app.task(bind=True, max_retries=1)(retry_forever),
        retry_once_slowly=app.task(bind=True)(retry_once_slowly),
    )


app = App()
tasks = build(app)
