"""Options the commands that talk to a broker share: where the broker is."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from ..app import App
from ..errors import TaskqError
from ..loading import load_app

APP_HELP = "Take the broker settings (and queue names) from this app, module:attribute. " \
           "[env: TASKQ_APP]"
URL_HELP = "Broker URL, if no app is given. [env: TASKQ_BROKER_URL]"

F = TypeVar("F", bound=Callable[..., Any])


def app_options(fn: F) -> F:
    """-A/--app and --broker/--broker-url, turned into the command's first argument, an App;
    a TaskqError, or the broker lost in the middle of the command, becomes one line."""

    @click.option("-A", "--app", "app_spec", envvar="TASKQ_APP", help=APP_HELP)
    @click.option("--broker", "--broker-url", "broker_url", envvar="TASKQ_BROKER_URL",
                  help=URL_HELP)
    @wraps(fn)
    def wrapper(app_spec: str | None, broker_url: str | None, **kwargs: Any) -> Any:
        app: App | None = None
        try:
            app = load_app(app_spec) if app_spec else App(broker_url)
            return fn(app, **kwargs)
        except TaskqError as exc:
            raise click.ClickException(str(exc)) from None
        except Exception as exc:  # the broker went away in the middle of the command
            if app is None or not app.broker.is_recoverable(exc):
                raise
            raise click.ClickException(f"lost the broker at {app.broker.display_url}: "
                                       f"{app.broker.describe(exc)}") from None

    return wrapper  # type: ignore[return-value]
