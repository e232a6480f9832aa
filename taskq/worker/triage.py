"""What a slot does with a message it received: run it, refuse it, count it, or put it back.

A pure decision from the message and the worker's settings: no broker, no side effects.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ..app import App
from ..errors import (
    ContentDisallowed,
    MessageDecodeError,
    NotRegistered,
    TaskExpired,
    WorkerLostError,
)
from ..message import Delivery, bounded_repr, parse_time
from ..serialization import CONTENT_TYPES, SERIALIZER_FOR
from ..task import Task
from .execute import Job

#: A message this close to its ETA runs now rather than taking another trip through the broker.
EARLY_TOLERANCE = 0.02


@dataclass(frozen=True)
class SlotOptions:
    """What every slot of a worker needs to know (picklable: sent to slot processes)."""

    app_spec: str
    queues: tuple[str, ...]
    pool: str
    loglevel: int
    time_limit: float | None
    soft_time_limit: float | None
    hostname: str
    #: This worker's own queue for broadcasts (its slots consume it with ``queues``).
    broadcast_queue: str | None = None
    #: Stop once the queues have nothing ready (``--burst``).
    burst: bool = False
    #: Replace the slot process after this many tasks / once its RSS is over this (MiB).
    max_tasks_per_child: int | None = None
    max_memory_per_child: float | None = None
    #: The worker's monitor's socket, for the slots' reports (see :mod:`.reports`).
    monitor_socket: str | None = None

    @property
    def consumed(self) -> list[str]:
        """Every queue a slot consumes: the worker's, and its broadcast queue."""
        extra = [self.broadcast_queue] if self.broadcast_queue else []
        return [*self.queues, *extra]


@dataclass(frozen=True)
class Run:
    job: Job
    hard_limit: float | None
    task: Task[Any, Any]


@dataclass(frozen=True)
class Refuse:
    """Dead-letter it, and tell its caller why."""

    error: BaseException


@dataclass(frozen=True)
class Later:
    """It arrived before its ETA: back to the broker's delay queues for ``seconds``."""

    seconds: float


Decision = Run | Refuse | Later


def triage(
    delivery: Delivery, app: App, options: SlotOptions, slot: str, lost_runs: int = 0
) -> Decision:
    """``lost_runs``: runs of this message cut short by the death of their process."""
    name = delivery.task_name
    if not name:
        return Refuse(
            MessageDecodeError(
                "message has no 'task' header: it is not a task message (Celery protocol v2)"
            )
        )
    accept = app.config.accept
    serializer = SERIALIZER_FOR.get(delivery.content_type or "")
    if serializer is None or serializer not in accept:
        accepted = ", ".join(CONTENT_TYPES[s] for s in accept)
        return Refuse(
            ContentDisallowed(
                f"content type {delivery.content_type!r} is not accepted by this worker "
                f"(accepted: {accepted})"
            )
        )
    task = app.tasks.get(name)
    if task is None:
        return Refuse(
            NotRegistered(
                f"no task named {bounded_repr(name)} is registered with this worker (it serves "
                f"{task_list(app)})"
            )
        )
    limit = app.config.delivery_limit
    if lost_runs >= limit:
        return Refuse(
            WorkerLostError(
                f"task {name}[{delivery.task_id}] was attempted {lost_runs} times and the "
                f"process running it died every time; dead-lettered as a poison message "
                f"(delivery_limit={limit})"
            )
        )
    headers = delivery.headers
    if headers.get("eta") or headers.get("expires"):
        decision = _schedule(delivery)
        if decision is not None:
            return decision
    hard, soft = time_limits(task, headers, options)
    return Run(
        Job(
            task=name,
            task_id=delivery.task_id or "",
            body=delivery.body,
            content_type=delivery.content_type,
            headers=headers,
            reply_to=reply_to(delivery),
            correlation_id=delivery.correlation_id,
            delivery_info={
                "exchange": delivery.exchange,
                "routing_key": delivery.routing_key,
                "queue": delivery.queue,
                "redelivered": delivery.redelivered,
                "slot": slot,
                "hostname": options.hostname,
            },
            time_limit=hard,
            soft_time_limit=soft,
            accept=accept,
        ),
        hard,
        task,
    )


def _schedule(delivery: Delivery) -> Decision | None:
    """Expired: refuse. Early (e.g. a Celery client's ETA task): later. Else None: run."""
    try:
        expires = parse_time(delivery.headers.get("expires"))
        eta = parse_time(delivery.headers.get("eta"))
    except ValueError as exc:
        return Refuse(MessageDecodeError(f"invalid eta/expires header: {exc}"))
    now = datetime.now(timezone.utc)
    if expires is not None and expires <= now:
        late = (now - expires).total_seconds()
        return Refuse(
            TaskExpired(
                f"task {delivery.task_name}[{delivery.task_id}] expired at {expires.isoformat()} "
                f"({late:.1f}s before a worker got to it); it was not run"
            )
        )
    if eta is not None:
        remaining = (eta - now).total_seconds()
        if remaining > EARLY_TOLERANCE:
            return Later(remaining)
    return None


def time_limits(
    task: Task[Any, Any], headers: dict[str, Any], options: SlotOptions
) -> tuple[float | None, float | None]:
    """(hard, soft) for one message: the message's own, else the task's, else the worker's."""
    hard = soft = None
    limits = headers.get("timelimit")
    if isinstance(limits, (list, tuple)) and len(limits) == 2:
        hard, soft = _positive(limits[0]), _positive(limits[1])
    hard = hard or task.options.time_limit or options.time_limit
    soft = soft or task.options.soft_time_limit or options.soft_time_limit
    return hard, soft


def reply_to(delivery: Delivery) -> str | None:
    """Where the result goes: nowhere if the sender said ``ignore_result`` (a Celery client
    sets reply_to even then, without declaring the queue)."""
    return None if delivery.headers.get("ignore_result") else delivery.reply_to


def task_list(app: App) -> str:
    names = sorted(app.tasks)
    shown = ", ".join(names[:10]) + (f", … ({len(names)} in all)" if len(names) > 10 else "")
    return shown or "no tasks"


def _positive(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None
