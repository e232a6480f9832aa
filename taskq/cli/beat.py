"""``taskq beat``: fire an app's periodic tasks (``app.schedule(...)``), or list them."""

from __future__ import annotations

import logging
import shutil

import click

from ..errors import TaskqError
from ..loading import load_app
from ..logs import setup_logging
from .worker import loglevel_option

APP_HELP = "The app whose schedule to run, as module:attribute (e.g. tasks:app). [env: TASKQ_APP]"
LIST_HELP = "Print the schedule (each entry's last fire and next due time) and exit."
HEADERS = ("NAME", "TASK", "SCHEDULE", "LAST FIRED", "NEXT DUE")


@click.command()
@click.option("-A", "--app", "app_spec", envvar="TASKQ_APP", required=True, help=APP_HELP)
@click.option("--list", "show", is_flag=True, help=LIST_HELP)
@loglevel_option
def beat(app_spec: str, show: bool, loglevel: str) -> None:
    """Send the app's periodic tasks when they are due.

    Run as many as you like, on any machines that share the broker: one is active, the
    others stand by and one takes over within a second if it stops or dies. Each due time is
    fired once; the record of what was fired is kept in the broker.
    """
    from ..beat import listing, run_beat

    setup_logging(logging.getLevelName(loglevel.upper()))
    try:
        app = load_app(app_spec)
        if show:
            for line in _table(listing(app)):
                click.echo(line)
            return
        code = run_beat(app)
    except TaskqError as exc:
        raise click.ClickException(str(exc)) from None
    raise SystemExit(code)


def _table(rows: list[tuple[str, str, str, str, str]]) -> list[str]:
    table = [HEADERS, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(HEADERS))]
    room = shutil.get_terminal_size((200, 20)).columns
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()[:room]
            for row in table]
