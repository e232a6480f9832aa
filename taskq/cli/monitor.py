"""``taskq status``, ``taskq inspect``, ``taskq events``, ``taskq revoke``: see and steer
the workers, on either broker (through Celery's remote-control and event protocols, which
taskq workers speak: see :mod:`taskq.worker.monitor`)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import click

from ..app import App
from ..broker.base import QueueStats
from .options import app_options

TIMEOUT_HELP = "How long to wait for workers' replies, seconds."
JSON_HELP = "Print JSON (for scripts) instead of a table."
DEST_HELP = "Ask only this worker (node name, e.g. taskq-4121@web1); repeatable."


def _table(header: Sequence[str], rows: list[Sequence[Any]]) -> list[str]:
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in cells]


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


# -- taskq inspect --------------------------------------------------------------------------

INSPECT_METHODS = ("ping", "active", "registered", "stats", "active_queues", "revoked",
                   "reserved", "scheduled", "conf")


@click.command()
@click.argument("method", type=click.Choice(INSPECT_METHODS))
@app_options
@click.option("-d", "--destination", multiple=True, metavar="WORKER", help=DEST_HELP)
@click.option("-t", "--timeout", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True, help=TIMEOUT_HELP)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def inspect(app: App, method: str, destination: tuple[str, ...], timeout: float,
            as_json: bool) -> None:
    """Ask the workers (taskq's and Celery's) on the broker: ping, active, registered,
    stats ... Exits 1 if no worker answers."""
    replies = app.control.broadcast(method, destination=destination or None, timeout=timeout)
    if as_json:
        click.echo(json.dumps(replies, indent=2, sort_keys=True, default=str))
    else:
        for node in sorted(replies):
            click.echo(f"{node}: {_summary(method, replies[node])}")
    if not replies:
        click.echo(f"no worker answered within {timeout:g}s", err=True)
        raise SystemExit(1)


def _summary(method: str, value: Any) -> str:
    if method == "ping" and isinstance(value, dict):
        return str(value.get("ok", value))
    if method == "active" and isinstance(value, list):
        now = time.time()
        lines = [f"{len(value)} running"]
        for task in value:
            started = task.get("time_start")
            runtime = f", {now - started:.1f}s" if isinstance(started, (int, float)) else ""
            lines.append(f"  {task.get('name')}[{task.get('id')}] args={task.get('args')}"
                         f"{runtime}")
        return "\n".join(lines)
    if method == "stats" and isinstance(value, dict):
        pool = value.get("pool") or {}
        return (f"pid {value.get('pid')}, concurrency {pool.get('max-concurrency')}, "
                f"processed {sum((value.get('total') or {}).values())}, uptime "
                f"{_ago(value.get('uptime'))}")
    if isinstance(value, list):
        return "\n".join([f"{len(value)}", *[f"  {_item(v)}" for v in value]])
    return json.dumps(value, sort_keys=True, default=str)


def _item(value: Any) -> str:
    if isinstance(value, dict) and "name" in value:
        return str(value["name"])
    return str(value)


# -- taskq revoke ---------------------------------------------------------------------------


@click.command()
@click.argument("task_ids", nargs=-1, required=True, metavar="TASK_ID...")
@app_options
@click.option("--terminate", is_flag=True,
              help="Also stop a run under way (its slot process is killed and replaced).")
@click.option("-t", "--timeout", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True, help="How long to wait for the workers' answers, seconds.")
def revoke(app: App, task_ids: tuple[str, ...], terminate: bool, timeout: float) -> None:
    """Revoke tasks: workers don't run them (dead-lettered, reason 'revoked'; their callers
    get TaskRevoked). Kept in the broker for the app's revoke_expires (7 days by default)."""
    replies = app.control.revoke(list(task_ids), terminate=terminate, wait=timeout)
    click.echo(f"revoked {len(task_ids)} task(s){' (terminate)' if terminate else ''}: kept "
               "in the broker for workers that get them later")
    for node, value in sorted(replies.items()):
        said = value.get("ok") or value.get("error") if isinstance(value, dict) else None
        click.echo(f"  {node}: {said or value}")
    if not replies:
        click.echo(f"  no worker answered within {timeout:g}s")


# -- taskq events ---------------------------------------------------------------------------


@click.command()
@app_options
@click.option("--dump", is_flag=True, help="One JSON object per line, as received.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
              help="Stop after this many seconds. [default: run until Ctrl-C]")
def events(app: App, dump: bool, timeout: float | None) -> None:
    """Tail the workers' events (workers started with -E, or after enable_events), one line
    each."""
    names: dict[str, str] = {}
    try:
        for event in app.control.events(timeout=timeout):
            if dump:
                click.echo(json.dumps(event, sort_keys=True, default=str))
            else:
                click.echo(_event_line(event, names))
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass


EVENT_FIELDS = {
    "task-received": ("args", "kwargs"), "task-succeeded": ("result", "runtime"),
    "task-failed": ("exception",), "task-retried": ("exception",),
    "task-rejected": ("exception",), "task-revoked": ("terminated",),
    "worker-heartbeat": ("active", "processed"),
}


def _event_line(event: dict[str, Any], names: dict[str, str]) -> str:
    kind = str(event.get("type"))
    stamp = event.get("timestamp")
    when = datetime.fromtimestamp(stamp).strftime("%H:%M:%S.%f")[:-3] \
        if isinstance(stamp, (int, float)) else "?"
    what = ""
    if "uuid" in event:
        task_id = str(event["uuid"])
        if event.get("name"):
            names[task_id] = str(event["name"])
            if len(names) > 100_000:
                names.clear()
        what = f" {names.get(task_id, '?')}[{task_id}]"
    details = []
    for key in EVENT_FIELDS.get(kind, ()):
        value = event.get(key)
        if key == "runtime" and isinstance(value, (int, float)):
            value = f"{value:.4f}s"
        details.append(f"{key}={value}")
    return f"{when} {event.get('hostname')} {kind}{what}" + \
        (" " + " ".join(details) if details else "")


# -- taskq status ---------------------------------------------------------------------------


@click.command()
@app_options
@click.option("-Q", "--queues", help="Also show these queues (comma-separated).")
@click.option("--watch", type=click.FloatRange(min=0.5), is_flag=False, flag_value=2.0,
              default=None, help="Redraw every N seconds (default 2) until Ctrl-C.")
@click.option("-t", "--timeout", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True, help=TIMEOUT_HELP)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def status(app: App, queues: str | None, watch: float | None, timeout: float,
           as_json: bool) -> None:
    """Queues (ready, unacked, consumers, dead letters, rates, oldest message) and workers
    (host, pid, queues, concurrency, tasks running now, processed, uptime)."""
    extra = [q.strip() for q in queues.split(",")] if queues else []
    with app.control.link() as link, app.broker.reach(
            lambda: app.broker.admin(timeout=app.config.connect_timeout)) as admin:
        before = _sample(app, link, admin, extra, timeout)
        try:
            while True:
                time.sleep(watch or 1.0)
                after = _sample(app, link, admin, extra, timeout)
                report = _report(app, before, after)
                if as_json:
                    click.echo(json.dumps(report, indent=None if watch else 2, default=str))
                else:
                    if watch:
                        click.clear()
                    click.echo("\n".join(_lines(app, report)))
                if not watch:
                    return
                before = after
        except KeyboardInterrupt:
            pass


def _sample(app: App, link: Any, admin: Any, extra: list[str], timeout: float
            ) -> dict[str, Any]:
    stats = app.control.broadcast("stats", timeout=timeout, link=link)
    active = app.control.broadcast("active", timeout=min(timeout, 0.5), link=link,
                                   limit=len(stats))
    names = set(extra) | {app.config.default_queue}
    names |= {t.options.queue for t in app.tasks.values() if t.options.queue}
    for value in stats.values():
        names |= set(((value or {}).get("taskq") or {}).get("queues") or ())
    names |= set(admin.known_queues())
    return {"at": time.monotonic(), "stats": stats, "active": active,
            "queues": {q.name: q for q in admin.queue_stats(sorted(names))}}


def _report(app: App, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    elapsed = max(1e-3, after["at"] - before["at"])

    def out_total(sample: dict[str, Any], queue: str) -> int:
        return sum(int((((v or {}).get("taskq") or {}).get("by_queue") or {}).get(queue, 0))
                   for v in sample["stats"].values())

    queues = []
    for name, now in sorted(after["queues"].items()):
        then: QueueStats | None = before["queues"].get(name)
        out = max(0, out_total(after, name) - out_total(before, name)) / elapsed
        rate_in = None
        if then is not None:
            held = (now.ready + (now.unacked or 0)) - (then.ready + (then.unacked or 0))
            rate_in = max(0.0, held / elapsed + out)
        queues.append({"queue": name, "ready": now.ready, "unacked": now.unacked,
                       "consumers": now.consumers, "dead_letters": now.dead,
                       "rate_in": rate_in, "rate_out": out, "oldest_age": now.oldest})
    workers = []
    now_wall = time.time()
    for node, value in sorted(after["stats"].items()):
        own = (value or {}).get("taskq") or {}
        pool = (value or {}).get("pool") or {}
        running = [{"name": t.get("name"), "id": t.get("id"),
                    "runtime": now_wall - t["time_start"]
                    if isinstance(t.get("time_start"), (int, float)) else None}
                   for t in after["active"].get(node) or []]
        workers.append({"worker": node, "host": node.partition("@")[2],
                        "pid": (value or {}).get("pid"), "queues": own.get("queues"),
                        "concurrency": pool.get("max-concurrency"), "running": running,
                        "processed": sum(((value or {}).get("total") or {}).values()),
                        "uptime": (value or {}).get("uptime"),
                        "kind": "taskq" if own else "celery"})
    return {"broker": app.broker.display_url, "queues": queues, "workers": workers}


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _lines(app: App, report: dict[str, Any]) -> list[str]:
    lines = [f"broker: {report['broker']}", ""]
    lines += _table(
        ("QUEUE", "READY", "UNACKED", "CONSUMERS", "DEAD", "IN/S", "OUT/S", "OLDEST"),
        [(q["queue"], q["ready"], _dash(q["unacked"]), _dash(q["consumers"]),
          _dash(q["dead_letters"]), _rate(q["rate_in"]), _rate(q["rate_out"]),
          _ago(q["oldest_age"])) for q in report["queues"]] or [("(none)",) + ("",) * 7])
    lines.append("")
    workers = report["workers"]
    lines += _table(
        ("WORKER", "PID", "QUEUES", "CONCURRENCY", "RUNNING", "PROCESSED", "UPTIME"),
        [(w["worker"], _dash(w["pid"]), ",".join(w["queues"] or []) or "-",
          _dash(w["concurrency"]), len(w["running"]), w["processed"],
          _ago(w["uptime"])) for w in workers] or [("(no worker answered)",) + ("",) * 6])
    for w in workers:
        for task in w["running"]:
            lines.append(f"  {w['worker']}: {task['name']}[{task['id']}] running for "
                         f"{_ago(task['runtime'])}")
    return lines
