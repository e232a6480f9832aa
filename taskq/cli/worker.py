"""``taskq worker``: serve the tasks of an app."""

from __future__ import annotations

import logging

import click

from ..errors import TaskqError
from ..loading import load_app
from ..logs import setup_logging

APP_HELP = "The app to serve, as module:attribute (e.g. tasks:app). [env: TASKQ_APP]"
QUEUES_HELP = "Comma-separated queues to consume. [default: the app's default_queue, 'taskq']"
CONCURRENCY_HELP = "Tasks run at once, each in its own process. [default: number of CPUs]"
POOL_HELP = (
    "Run each slot as a process (CPU-bound tasks use N cores) or as a thread of one "
    "process (I/O-bound tasks; no soft time limits)."
)
LOGLEVEL_HELP = "Log level."
TIME_LIMIT_HELP = "Hard time limit per task, seconds: the task's process is killed."
SOFT_TIME_LIMIT_HELP = "Soft time limit per task, seconds: SoftTimeLimitExceeded is raised in it."
SHUTDOWN_HELP = "On SIGTERM/SIGINT, how long running tasks may take to finish, seconds."
BURST_HELP = (
    "Run until the queues have no message ready, then exit 0 (for scripts and tests). "
    "Delayed messages (countdown, eta, retries) stay queued for a later worker."
)
BIND_HELP = (
    "Bind the -Q queues to a topic pattern (repeatable): tasks sent with a routing key it "
    "matches reach them ('*' is one word, '#' any number: eu.orders.*, eu.#). Bindings stay "
    "in the broker after the worker stops."
)
MAX_TASKS_HELP = "Replace a slot process after it ran this many tasks (between tasks)."
MAX_MEMORY_HELP = "Replace a slot process, between tasks, once its RSS is over this many MiB."
BEAT_HELP = (
    "Also fire the app's periodic tasks (app.schedule), as `taskq beat` does: active, or "
    "standing by while another beat is."
)

EVENTS_HELP = (
    "Publish Celery's task and worker events (Flower, celery events, taskq events). Off by "
    "default; Celery's enable_events/disable_events commands switch it at run time."
)
NODENAME_HELP = (
    "The worker's node name for remote control and events, as Celery's -n: %h host, %n its "
    "first label, %p the pid. [default: taskq-<pid>@<host>]"
)
METRICS_HELP = "Serve Prometheus metrics on this port (/metrics); needs taskq[metrics]."

LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


#: ``-l/--loglevel``, as every long-running command takes it.
loglevel_option = click.option(
    "-l",
    "--loglevel",
    type=click.Choice(LEVELS, case_sensitive=False),
    default="INFO",
    show_default=True,
    envvar="TASKQ_LOGLEVEL",
    help=LOGLEVEL_HELP,
)


@click.command()
@click.option("-A", "--app", "app_spec", envvar="TASKQ_APP", required=True, help=APP_HELP)
@click.option("-Q", "--queues", envvar="TASKQ_QUEUES", help=QUEUES_HELP)
@click.option(
    "-c",
    "--concurrency",
    type=click.IntRange(min=1),
    envvar="TASKQ_CONCURRENCY",
    help=CONCURRENCY_HELP,
)
@click.option(
    "-P",
    "--pool",
    type=click.Choice(["process", "threads"]),
    default="process",
    show_default=True,
    help=POOL_HELP,
)
@loglevel_option
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), help=TIME_LIMIT_HELP)
@click.option(
    "--soft-time-limit", type=click.FloatRange(min=0, min_open=True), help=SOFT_TIME_LIMIT_HELP
)
@click.option(
    "--shutdown-timeout",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help=SHUTDOWN_HELP,
)
@click.option("--bind", "binds", multiple=True, metavar="PATTERN", help=BIND_HELP)
@click.option("--burst", is_flag=True, help=BURST_HELP)
@click.option("--max-tasks-per-child", type=click.IntRange(min=1), help=MAX_TASKS_HELP)
@click.option(
    "--max-memory-per-child", type=click.FloatRange(min=0, min_open=True), help=MAX_MEMORY_HELP
)
@click.option("--beat", is_flag=True, help=BEAT_HELP)
@click.option("-E", "--events", is_flag=True, envvar="TASKQ_EVENTS", help=EVENTS_HELP)
@click.option("-n", "--hostname", "nodename", envvar="TASKQ_NODENAME", help=NODENAME_HELP)
@click.option("--metrics-port", type=click.IntRange(min=0, max=65535), envvar="TASKQ_METRICS_PORT",
              help=METRICS_HELP)
def worker(
    app_spec: str,
    queues: str | None,
    concurrency: int | None,
    pool: str,
    loglevel: str,
    time_limit: float | None,
    soft_time_limit: float | None,
    shutdown_timeout: float,
    binds: tuple[str, ...],
    burst: bool,
    max_tasks_per_child: int | None,
    max_memory_per_child: float | None,
    beat: bool,
    events: bool,
    nodename: str | None,
    metrics_port: int | None,
) -> None:
    """Run tasks from the queues of an app.

    Each of the -c slots takes one message at a time (prefetch 1) and acks it only after the
    task ran and its result was sent, so a worker that dies loses nothing.
    """
    from ..worker import Worker

    level = logging.getLevelName(loglevel.upper())
    setup_logging(level)
    try:
        app = load_app(app_spec)
        names = [q.strip() for q in queues.split(",")] if queues else None
        code = Worker(
            app,
            app_spec=app_spec,
            queues=names,
            concurrency=concurrency,
            pool=pool,
            loglevel=level,
            time_limit=time_limit,
            soft_time_limit=soft_time_limit,
            shutdown_timeout=shutdown_timeout,
            binds=list(binds),
            burst=burst,
            max_tasks_per_child=max_tasks_per_child,
            max_memory_per_child=max_memory_per_child,
            beat=beat,
            events=events,
            nodename=nodename,
            metrics_port=metrics_port,
        ).run()
    except TaskqError as exc:
        raise click.ClickException(str(exc)) from None
    raise SystemExit(code)
