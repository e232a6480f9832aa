"""``taskq dlq``: look at, replay and purge dead-letter queues."""

from __future__ import annotations

import shutil
from functools import wraps
from typing import Any

import click

from ..app import App
from ..broker.base import DeadLetter
from ..dlq import DeadLetters, details
from .options import F, app_options

QUEUE_ARG_HELP = "QUEUE is the work queue (its dead letters are in QUEUE.dlq)."

def broker_options(fn: F) -> F:
    """The broker options (see :mod:`.options`), turned into a DeadLetters."""

    @app_options
    @wraps(fn)
    def wrapper(app: App, **kwargs: Any) -> Any:
        return fn(DeadLetters(app), **kwargs)

    return wrapper  # type: ignore[return-value]


@click.group()
def dlq() -> None:
    """Dead-letter queues: messages a worker could not run, with the reason.

    Every work queue QUEUE has one, QUEUE.dlq. A message lands there when its task is unknown,
    its arguments don't fit, its body can't be decoded or has a refused content type, it
    expired, or its worker died on it delivery_limit times.
    """


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: max(1, width - 1)] + "…"


def _table(letters: list[DeadLetter]) -> list[str]:
    rows = [("ID", "TASK", "EXCEPTION", "DEAD AT", "REASON")]
    rows += [
        (d.id, d.task, d.exception, d.dead_at[:19].replace("T", " "), d.reason) for d in letters
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    room = max(20, shutil.get_terminal_size((140, 20)).columns - sum(widths) - 8)
    return [
        "  ".join(
            [
                *(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)),
                _short(row[4], room),
            ]
        ).rstrip()
        for row in rows
    ]


@dlq.command("list")
@click.argument("queue")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Show at most this many.",
)
@broker_options
def list_(letters: DeadLetters, queue: str, limit: int) -> None:
    """List the dead letters of QUEUE (nothing is removed)."""
    total, found = letters.browse(queue, limit)
    name = letters.name(queue)
    if not total:
        click.echo(f"{name}: empty")
        return
    shown = f" (showing {len(found)})" if len(found) < total else ""
    click.echo(f"{name}: {total} dead letter{'s' if total != 1 else ''}{shown}")
    for line in _table(found):
        click.echo(line)


@dlq.command()
@click.argument("task_id", metavar="ID")
@click.option(
    "-Q",
    "--queues",
    envvar="TASKQ_QUEUES",
    default="taskq",
    show_default=True,
    help="Comma-separated work queues whose dead letters to search.",
)
@broker_options
def show(letters: DeadLetters, task_id: str, queues: str) -> None:
    """Show everything about the dead letter of task ID."""
    names = [q.strip() for q in queues.split(",") if q.strip()]
    found = letters.find(task_id, names)
    if found is None:
        raise click.ClickException(
            f"no dead letter with id {task_id} in {', '.join(letters.name(q) for q in names)} "
            "(use -Q to search other queues)"
        )
    for key, value in details(found).items():
        click.echo(f"{key + ':':14} {value}")


@dlq.command()
@click.argument("queue")
@click.option("--id", "ids", multiple=True, metavar="ID", help="Replay this one (repeatable).")
@click.option("--all", "everything", is_flag=True, help="Replay every dead letter of QUEUE.")
@broker_options
def replay(letters: DeadLetters, queue: str, ids: tuple[str, ...], everything: bool) -> None:
    """Send dead letters of QUEUE back to their queue, to run again."""
    if bool(ids) == everything:
        raise click.UsageError("say which: --id ID (repeatable) or --all")
    found: set[str] = set()
    count = 0
    for letter, note in letters.replay(queue, None if everything else ids):
        if not everything:
            found.add(letter.id)  # to name the ids asked for that were not there
        count += 1
        click.echo(
            f"replayed {letter.id} ({letter.task}) to {letter.original_queue}"
            + (f": {note}" if note else "")
        )
    click.echo(f"{count} replayed")
    missing = sorted(set(ids) - found)
    if missing:
        raise click.ClickException(f"not found in {letters.name(queue)}: {', '.join(missing)}")


@dlq.command()
@click.argument("queue")
@click.option("--yes", is_flag=True, help="Don't ask for confirmation.")
@broker_options
def purge(letters: DeadLetters, queue: str, yes: bool) -> None:
    """Delete every dead letter of QUEUE, for good."""
    total, _ = letters.browse(queue, 1)
    name = letters.name(queue)
    if not total:
        click.echo(f"{name}: empty")
        return
    if not yes:
        click.confirm(
            f"Delete {total} dead letter(s) from {name}? This cannot be undone", abort=True
        )
    click.echo(f"purged {letters.purge(queue)} dead letter(s) from {name}")


dlq.help = (dlq.help or "") + "\n\n" + QUEUE_ARG_HELP
