"""The ``taskq`` command."""

from __future__ import annotations

import click

from .. import __version__
from .beat import beat
from .dlq import dlq
from .monitor import events, inspect, revoke, status
from .worker import worker


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="taskq")
def main() -> None:
    """taskq: a task queue, embedded (one machine, nothing to install) or on RabbitMQ.

    \b
    Start a worker for the tasks of tasks.py:
        taskq worker -A tasks:app -c 4
    The broker URL comes from the App: its argument, else $TASKQ_BROKER_URL, else the
    embedded broker in ./taskq.db (sqlite:///taskq.db).
    """


main.add_command(worker)
main.add_command(dlq)
main.add_command(beat)
main.add_command(status)
main.add_command(inspect)
main.add_command(events)
main.add_command(revoke)
