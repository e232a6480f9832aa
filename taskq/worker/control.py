"""The remote-control commands a worker answers: Celery's pidbox commands, by name.

Each handler takes the worker's :class:`~taskq.worker.monitor.Monitor` and the command's
arguments and returns the reply value, shaped as a Celery worker's (so ``celery inspect`` and
Flower read it); commands that act (``revoke``, ``shutdown``, ``add_consumer`` ...) act through
the monitor. An unknown command gets Celery's ``{"error": ...}`` reply.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import __version__

if TYPE_CHECKING:
    from .monitor import Monitor

Handler = Callable[["Monitor", dict[str, Any]], Any]
HANDLERS: dict[str, Handler] = {}


def command(name: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        HANDLERS[name] = handler
        return handler

    return register


def handle(monitor: Monitor, method: str, arguments: dict[str, Any]) -> Any:
    handler = HANDLERS.get(method)
    if handler is None:
        return {"error": f"No such control command: {method}"}
    try:
        return handler(monitor, arguments)
    except Exception as exc:  # a bad argument: said to the sender, never a crash
        return {"error": f"{method} failed: {type(exc).__name__}: {exc}"}


@command("ping")
def ping(monitor: Monitor, arguments: dict[str, Any]) -> Any:
    return {"ok": "pong"}


@command("hello")
def hello(monitor: Monitor, arguments: dict[str, Any]) -> Any:
    """A starting Celery worker's greeting: it learns the revocations (Celery's mingle)."""
    return {"revoked": dict(monitor.revocations), "clock": monitor.clock}


@command("clock")
def clock(monitor: Monitor, arguments: dict[str, Any]) -> Any:
    return {"clock": monitor.clock}


@command("stats")
def stats(monitor: Monitor, arguments: dict[str, Any]) -> Any:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    options = monitor.options
    return {
        "total": dict(monitor.totals()),
        "pid": os.getpid(),
        "clock": str(monitor.clock),
        "uptime": int(time.time() - monitor.started),
        "pool": {
            "implementation": f"taskq:{options.pool}",
            "max-concurrency": monitor.concurrency,
            "processes": monitor.slot_pids(),
            "max-tasks-per-child": options.max_tasks_per_child or "N/A",
            "put-guarded-by-semaphore": False,
            "timeouts": [options.soft_time_limit or 0, options.time_limit or 0],
            "writes": {"total": 0, "avg": "0.00%", "all": "", "raw": "", "strategy": "fair",
                       "inqueues": {"total": 0, "active": 0}},
        },
        "broker": monitor.broker_info(),
        "prefetch_count": monitor.concurrency,
        "rusage": {
            "utime": usage.ru_utime, "stime": usage.ru_stime, "maxrss": usage.ru_maxrss,
            "ixrss": usage.ru_ixrss, "idrss": usage.ru_idrss, "isrss": usage.ru_isrss,
            "minflt": usage.ru_minflt, "majflt": usage.ru_majflt, "nswap": usage.ru_nswap,
            "inblock": usage.ru_inblock, "oublock": usage.ru_oublock,
            "msgsnd": usage.ru_msgsnd, "msgrcv": usage.ru_msgrcv,
            "nsignals": usage.ru_nsignals, "nvcsw": usage.ru_nvcsw, "nivcsw": usage.ru_nivcsw,
        },
        # taskq's own, for taskq status
        "taskq": {
            "version": __version__, "hostname": options.hostname,
            "queues": list(monitor.queues), "processed": monitor.processed(),
            "by_queue": monitor.by_queue(), "outcomes": monitor.outcomes(),
            "events": monitor.events_enabled, "sw_sys": platform.system(),
        },
    }


@command("active")
def active(monitor: Monitor, arguments: dict[str, Any]) -> Any:
    return monitor.active(safe=bool(arguments.get("safe")))


@command("reserved")
def reserved(monitor: Monitor, arguments: dict[str, Any]) -> Any:
    return []  # prefetch 1: a slot holds only the message it runs (see "active")


@command("scheduled")
def scheduled(monitor: Monitor, arguments: dict[str, Any]) -> Any:
    return []  # countdowns wait in the broker, not in a worker


@command("registered")
def registered(monitor: Monitor, arguments: dict[str, Any]) -> Any:
    return sorted(monitor.app.tasks)


@command("active_queues")
def active_queues(monitor: Monitor, arguments: dict[str, Any]) -> Any:
    return [_queue_info(name) for name in monitor.queues]


def _queue_info(name: str) -> dict[str, Any]:
    """A queue as kombu's ``Queue.as_dict(recurse=True)`` shows it (what Flower reads)."""
    return {
        "name": name,
        "exchange": {"name": "", "type": "direct", "arguments": None, "durable": True,
                     "passive": False, "auto_delete": False, "delivery_mode": None,
                     "no_declare": False},
        "routing_key": name, "queue_arguments": None, "binding_arguments": None,
        "consumer_arguments": None, "durable": True, "exclusive": False,
        "auto_delete": False, "no_ack": False, "alias": None, "bindings": [],
        "no_declare": None, "expires": None, "message_ttl": None, "max_length": None,
        "max_length_bytes": None, "max_priority": None,
    }


@command("revoked")
def revoked(monitor: Monitor, arguments: dict[str, Any]) -> Any:
    return sorted(monitor.revocations)


@command("conf")
def conf(monitor: Monitor, arguments: dict[str, Any]) -> Any:
    return monitor.masked_conf()


@command("enable_events")
def enable_events(monitor: Monitor, arguments: dict[str, Any]) -> Any:
    monitor.set_events(True)
    return {"ok": "task events enabled"}


@command("disable_events")
def disable_events(monitor: Monitor, arguments: dict[str, Any]) -> Any:
    monitor.set_events(False)
    return {"ok": "task events disabled"}


@command("revoke")
def revoke(monitor: Monitor, arguments: dict[str, Any]) -> Any:
    ids = arguments.get("task_id")
    task_ids = [ids] if isinstance(ids, str) else (
        [str(i) for i in ids] if isinstance(ids, list) else [])
    if not task_ids:
        return {"error": "revoke needs task_id: a task id or a list of them"}
    terminate = bool(arguments.get("terminate"))
    stopped = monitor.revoke(task_ids, terminate=terminate,
                             stored=bool(arguments.get("stored")))
    shown = ", ".join(task_ids[:5]) + (f" and {len(task_ids) - 5} more"
                                       if len(task_ids) > 5 else "")
    said = f"tasks {shown} flagged as revoked"
    if terminate:
        said += f"; terminated {', '.join(stopped)}" if stopped else "; none was running here"
        if monitor.threads:
            said += " (-P threads: a running task can't be stopped)"
    return {"ok": said}


@command("shutdown")
def shutdown(monitor: Monitor, arguments: dict[str, Any]) -> Any:
    monitor.worker.shutdown()
    return {"ok": "shutting down (warm: running tasks finish first)"}


@command("add_consumer")
def add_consumer(monitor: Monitor, arguments: dict[str, Any]) -> Any:
    return _consume(monitor, arguments, "add_consumer", add=True)


@command("cancel_consumer")
def cancel_consumer(monitor: Monitor, arguments: dict[str, Any]) -> Any:
    return _consume(monitor, arguments, "cancel_consumer", add=False)


def _consume(monitor: Monitor, arguments: dict[str, Any], method: str, *, add: bool) -> Any:
    queue = arguments.get("queue")
    if not isinstance(queue, str) or not queue:
        return {"error": f"{method} needs a queue name"}
    return monitor.worker.consume(queue, add=add)
