"""Running one task message: decode, check, call, encode the outcome.

This runs where the task runs (in the slot's own thread, or in its executor child for a task
with a hard time limit) and never touches the broker: it turns a :class:`Job` into an
:class:`Outcome` for the slot, which publishes results, acks, retries and dead-letters.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
import traceback as tb
from types import TracebackType
from typing import Any, NamedTuple

from .. import states
from ..app import App
from ..broker.base import After
from ..errors import (
    ContentDisallowed,
    DecodeError,
    EncodeError,
    MessageDecodeError,
    NotRegistered,
    Retry,
    SoftTimeLimitExceeded,
)
from ..hooks import FAILED, RETRIED, SUCCEEDED, TaskRun
from ..message import (
    BROADCAST_HEADER,
    Delivery,
    bounded_repr,
    exception_to_wire,
    parse_full_body,
    parse_time,
    result_body,
)
from ..serialization import CONTENT_TYPES, SERIALIZER_FOR
from ..task import Request, Task, current_request
from . import flow

log = logging.getLogger("taskq.task")

#: The end of a traceback an event carries (characters).
REPORTED_TRACE = 8000

_OWN_FILES = frozenset({__file__, sys.modules[Request.__module__].__file__})


class Job(NamedTuple):
    """A task to run: the message, minus anything broker-specific (picklable, for the
    executor child that runs tasks with a hard time limit)."""

    task: str
    task_id: str
    body: bytes
    content_type: str | None
    headers: dict[str, Any]
    reply_to: str | None
    correlation_id: str | None
    delivery_info: dict[str, Any]
    time_limit: float | None
    soft_time_limit: float | None
    accept: tuple[str, ...]
    #: Someone watches (events, metrics): the outcome carries :attr:`Outcome.report`.
    report: bool = False


class Outcome(NamedTuple):
    """What came of a job.

    kind "done": the task returned or raised; ``body`` is the result message (None if nobody
    wants it).  kind "reject": the message can't be run (``exc_type``/``detail`` say why);
    ``body`` is the FAILURE to send the caller.  kind "retry": run it again in ``countdown``
    seconds; ``body`` is the RETRY state for the caller.
    """

    kind: str
    body: bytes | None
    content_type: str
    exc_type: str = ""
    detail: str = ""
    countdown: float = 0.0
    #: A workflow's next move, stored by the settle (see :mod:`taskq.worker.flow`).
    after: After | None = None
    #: The task raised (kind "done": a FAILURE; "retry": the reason to retry).
    failed: bool = False
    #: For the worker's monitor when :attr:`Job.report`: Celery's event fields (``result``,
    #: ``exception``, ``traceback``, ``runtime``).
    report: dict[str, Any] | None = None


def _serializer(content_type: str | None) -> tuple[str, str]:
    """Results go back in the serializer the task came in (JSON unless the caller used pickle)."""
    name = SERIALIZER_FOR.get(content_type or "", "json")
    return name, CONTENT_TYPES[name]


def answerer(headers: dict[str, Any], hostname: str | None) -> str | None:
    """Who answers, in the result of a broadcast (None for any other message)."""
    return hostname if BROADCAST_HEADER in headers else None


def failure_outcome(
    task_id: str, exc: BaseException, *, kind: str, worker: str | None = None
) -> Outcome:
    """A FAILURE decided outside the task (rejection, time limit): no traceback to send."""
    body = result_body("json", task_id, states.FAILURE, exception_to_wire(exc), worker=worker)
    return Outcome(kind, body, "application/json", type(exc).__name__, str(exc), failed=True,
                   report={"exception": bounded_repr(exc), "traceback": ""})


def reject(job: Job, exc: BaseException) -> Outcome:
    return failure_outcome(job.task_id, exc, kind="reject", worker=_worker(job))


def _worker(job: Job) -> str | None:
    return answerer(job.headers, job.delivery_info.get("hostname"))


def _on_soft_limit(signum: int, frame: Any) -> None:
    raise SoftTimeLimitExceeded("soft time limit exceeded")


def install_soft_limit_handler() -> None:
    signal.signal(signal.SIGALRM, _on_soft_limit)


def execute(app: App, job: Job, *, use_signals: bool = True) -> Outcome:
    """Run one task message; whatever happens, return what the slot should do about it."""
    admitted = _admit(app, job)
    if isinstance(admitted, Outcome):
        return admitted
    task, args, kwargs, embed = admitted
    run = _begin(app, task, job, args, kwargs)
    token = current_request.set(run.request if run else lambda: _request(job, args, kwargs))
    soft = job.soft_time_limit if use_signals else None
    started = time.perf_counter()
    try:
        value = _call(task, args, kwargs, soft)
    except Retry as retry:
        return _retried(app, run, job, retry, time.perf_counter() - started)
    except BaseException as exc:
        if task.options.autoretry_for and isinstance(exc, task.options.autoretry_for):
            try:
                task.retry(exc=exc)
            except Retry as retry:
                return _retried(app, run, job, retry, time.perf_counter() - started)
            except BaseException as final:
                exc = final
        return _failed(app, run, job, exc, time.perf_counter() - started, embed)
    finally:
        current_request.reset(token)
    runtime = time.perf_counter() - started
    try:
        outcome = _success(job, value, runtime)
        if job.report:
            outcome = outcome._replace(report={"result": bounded_repr(value),
                                               "runtime": runtime})
        if embed and flow.is_flow(embed):
            outcome = outcome._replace(
                after=flow.after_success(app, embed, job.headers, job.task_id, value))
    except Exception as exc:  # the result, or the workflow's next message, can't be made
        return _failed(app, run, job, exc, runtime, embed)
    if run is not None:
        run.outcome, run.runtime, run.result = SUCCEEDED, runtime, value
        _handler(run, "on_success", value, job.task_id, run.request.args, run.request.kwargs)
        app.hooks.call("after_task", app.hooks.after_task, run)
    return outcome


def _call(task: Task[Any, Any], args: list[Any], kwargs: dict[str, Any],
          soft: float | None) -> Any:
    if not soft:
        return task.run(args, kwargs)
    signal.setitimer(signal.ITIMER_REAL, soft)
    try:
        return task.run(args, kwargs)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _begin(
    app: App, task: Task[Any, Any], job: Job, args: list[Any], kwargs: dict[str, Any]
) -> TaskRun | None:
    """The run the hooks see (None when nothing watches: the request is then built only if
    the task asks for it), after the before_task hooks."""
    hooks = app.hooks
    if not (hooks.before_task or hooks.after_task or hooks.failure or task.has_handlers):
        return None
    run = TaskRun(task, _request(job, args, kwargs))
    hooks.call("before_task", hooks.before_task, run)
    return run


def _handler(run: TaskRun, name: str, *args: Any) -> None:
    """The task class's own handler (``on_success`` ...), if it has one: like a hook, what
    it raises is logged and changes nothing."""
    if run.task.has_handlers:
        run.task.app.hooks.call(f"{run.task.name}.{name}", [getattr(run.task, name)], *args)


def _retried(app: App, run: TaskRun | None, job: Job, retry: Retry, runtime: float) -> Outcome:
    outcome = _retry_outcome(job, retry)
    if job.report:
        reason = retry.exc or retry
        outcome = outcome._replace(report={"exception": bounded_repr(reason),
                                           "traceback": _trace(reason)[-REPORTED_TRACE:]})
    if run is not None:
        run.outcome, run.runtime, run.exception = RETRIED, runtime, retry.exc or retry
        run.traceback = _trace(run.exception)
        _handler(run, "on_retry", run.exception, job.task_id, run.request.args,
                 run.request.kwargs, run.traceback)
        app.hooks.call("after_task", app.hooks.after_task, run)
    return outcome


def _failed(
    app: App, run: TaskRun | None, job: Job, exc: BaseException, runtime: float,
    embed: dict[str, Any] | None = None,
) -> Outcome:
    trace = _trace(exc)
    outcome = _failure(job, exc, runtime, trace)._replace(failed=True)
    if job.report:
        outcome = outcome._replace(report={"exception": bounded_repr(exc),
                                           "traceback": trace[-REPORTED_TRACE:],
                                           "runtime": runtime})
    if embed and flow.is_flow(embed):
        outcome = outcome._replace(
            after=flow.after_failure(app, embed, job.headers, job.task, job.task_id, exc,
                                     trace))
    if run is not None:
        run.outcome, run.runtime, run.exception, run.traceback = FAILED, runtime, exc, trace
        _handler(run, "on_failure", exc, job.task_id, run.request.args, run.request.kwargs,
                 trace)
        app.hooks.call("on_failure", app.hooks.failure, run)
        app.hooks.call("after_task", app.hooks.after_task, run)
    return outcome


def _admit(
    app: App, job: Job
) -> tuple[Task[Any, Any], list[Any], dict[str, Any], dict[str, Any]] | Outcome:
    """The task and its decoded arguments, or the rejection saying why it can't run."""
    task = app.tasks.get(job.task)
    if task is None:
        return reject(job, NotRegistered(f"no task named {job.task!r} is registered here"))
    delivery = Delivery(
        job.body,
        job.content_type,
        job.headers,
        job.correlation_id,
        job.reply_to,
        bool(job.delivery_info.get("redelivered")),
        "",
    )
    try:
        args, kwargs, embed = parse_full_body(delivery, job.accept)
    except ContentDisallowed as exc:
        return reject(job, exc)
    except DecodeError as exc:
        return reject(job, MessageDecodeError(str(exc)))
    try:
        task.check_arguments(args, kwargs)
    except TypeError as exc:
        return reject(job, TypeError(f"arguments do not fit {exc}"))
    return task, args, kwargs, embed


def _request(job: Job, args: list[Any], kwargs: dict[str, Any]) -> Request:
    headers = job.headers
    return Request(
        id=job.task_id,
        task=job.task,
        args=args,
        kwargs=kwargs,
        retries=int(headers.get("retries") or 0),
        eta=_time_or_none(headers.get("eta")),
        expires=_time_or_none(headers.get("expires")),
        reply_to=job.reply_to,
        correlation_id=job.correlation_id,
        root_id=headers.get("root_id"),
        parent_id=headers.get("parent_id"),
        delivery_info=job.delivery_info,
        time_limit=job.time_limit,
        soft_time_limit=job.soft_time_limit,
        headers=headers,
    )


def _time_or_none(value: Any) -> Any:
    try:
        return parse_time(value)
    except ValueError:
        return None


def _success(job: Job, value: Any, runtime: float) -> Outcome:
    serializer, content_type = _serializer(job.content_type)
    log.debug("task %s[%s] succeeded in %.4fs", job.task, job.task_id, runtime)
    if not job.reply_to:
        return Outcome("done", None, content_type)
    try:
        body = result_body(serializer, job.task_id, states.SUCCESS, value, worker=_worker(job))
    except EncodeError as exc:
        raise EncodeError(f"return value of {job.task} can't be sent: {exc}") from None
    return Outcome("done", body, content_type)


def _user_frames(exc: BaseException) -> TracebackType | None:
    """The traceback from the task's own code on: taskq's frames above it are noise."""
    frames = exc.__traceback__
    while frames is not None and frames.tb_frame.f_code.co_filename in _OWN_FILES:
        frames = frames.tb_next
    return frames or exc.__traceback__


def _trace(exc: BaseException) -> str:
    return "".join(tb.format_exception(type(exc), exc, _user_frames(exc)))


def _failure(job: Job, exc: BaseException, runtime: float, trace: str) -> Outcome:
    log.error(
        "task %s[%s] raised %s after %.4fs:\n%s",
        job.task,
        job.task_id,
        type(exc).__name__,
        runtime,
        trace.rstrip(),
    )
    if not job.reply_to:
        return Outcome("done", None, "application/json")
    body = result_body("json", job.task_id, states.FAILURE, exception_to_wire(exc), trace,
                       worker=_worker(job))
    return Outcome("done", body, "application/json")


def _retry_outcome(job: Job, retry: Retry) -> Outcome:
    reason = repr(retry.exc) if retry.exc is not None else "retry requested"
    log.warning(
        "task %s[%s] will retry in %.1fs: %s", job.task, job.task_id, retry.countdown, reason
    )
    body = None
    if job.reply_to:
        wire = exception_to_wire(retry.exc) if retry.exc is not None else None
        body = result_body("json", job.task_id, states.RETRY, wire)
    return Outcome("retry", body, "application/json", "Retry", reason, retry.countdown)
