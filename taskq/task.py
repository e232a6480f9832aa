"""Task: a function that can also be sent to a worker (``.delay()``/``.apply_async()``)."""

from __future__ import annotations

import contextvars
import functools
import inspect
import math
import os
import random
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Generic, Literal, ParamSpec, TypeVar, overload

from .errors import ConfigurationError, MaxRetriesExceededError, Retry
from .rates import check_scope, interval_of

if TYPE_CHECKING:
    from .app import App
    from .canvas import Signature
    from .result import AsyncResult, BroadcastResult, EagerResult

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class TaskOptions:
    """Per-task settings given to ``@app.task(...)``."""

    name: str
    queue: str | None = None
    bind: bool = False
    ignore_result: bool = False
    max_retries: int | None = 3
    default_retry_delay: float = 180.0
    autoretry_for: tuple[type[BaseException], ...] = ()
    retry_backoff: float | bool = False
    retry_backoff_max: float = 600.0
    retry_jitter: bool = True
    time_limit: float | None = None
    soft_time_limit: float | None = None
    #: Higher runs first on a priority queue (see ``App(max_priority=...)``).
    priority: int | None = None
    #: At most one start per interval, e.g. "100/m" (see :mod:`taskq.rates`).
    rate_limit: str | float | None = None
    rate_limit_scope: str = "worker"
    #: Sent to every worker of its queue that is up, each runs it once.
    broadcast: bool = False


@dataclass(frozen=True)
class Request:
    """What a running task knows about its own message (``self.request`` in bound tasks)."""

    id: str | None = None
    task: str | None = None
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    retries: int = 0
    eta: datetime | None = None
    expires: datetime | None = None
    reply_to: str | None = None
    correlation_id: str | None = None
    root_id: str | None = None
    parent_id: str | None = None
    delivery_info: dict[str, Any] = field(default_factory=dict)
    time_limit: float | None = None
    soft_time_limit: float | None = None
    headers: dict[str, Any] = field(default_factory=dict)

    @property
    def called_directly(self) -> bool:
        """True when the function was called in-process rather than run by a worker."""
        return self.id is None


_EMPTY_REQUEST = Request()
#: The running task's Request, or a function that builds it: built on first use only, since
#: most tasks never look at it.
current_request: contextvars.ContextVar[Request | Callable[[], Request]] = contextvars.ContextVar(
    "taskq_request", default=_EMPTY_REQUEST
)


def main_module_name() -> str:
    """The importable name of the script run as ``__main__`` (``python tasks.py`` → tasks).

    A worker imports the module by that name, so tasks defined in a script get the same
    names in the script that sends them and in the worker that runs them.
    """
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        name = str(spec.name)
        return name[: -len(".__main__")] if name.endswith(".__main__") else name
    path = getattr(main, "__file__", None)
    if path:
        stem = str(path).replace("\\", "/").rsplit("/", 1)[-1]
        return stem[:-3] if stem.endswith(".py") else stem
    return "__main__"


def _simple_arity(signature: inspect.Signature) -> tuple[int, int] | None:
    params = signature.parameters.values()
    if any(p.kind is not p.POSITIONAL_OR_KEYWORD for p in params):
        return None
    return sum(p.default is p.empty for p in params), len(params)


def _bare(signature: inspect.Signature) -> inspect.Signature:
    params = [p.replace(annotation=p.empty) for p in signature.parameters.values()]
    return signature.replace(parameters=params, return_annotation=signature.empty)


def to_aware(moment: datetime, what: str) -> datetime:
    if moment.tzinfo is None or moment.tzinfo.utcoffset(moment) is None:
        raise ConfigurationError(
            f"{what} must be a timezone-aware datetime (a naive one is ambiguous): use "
            "datetime.now(timezone.utc) + timedelta(...), or countdown=seconds"
        )
    return moment


class Task(Generic[P, R]):
    """A registered task. Call it to run the function here; ``.delay()`` to run it on a worker."""

    def __init__(self, app: App, fn: Callable[..., R], options: TaskOptions) -> None:
        self.app = app
        self.fn = fn
        self.options = options
        self.name = options.name
        signature = inspect.signature(fn)
        if options.bind:
            params = list(signature.parameters.values())
            if not params:
                raise ConfigurationError(
                    f"task {options.name} has bind=True but takes no 'self' parameter"
                )
            signature = signature.replace(parameters=params[1:])
        #: The signature callers must match (without ``self`` for bound tasks).
        self.parameters = signature
        #: How error messages show it: ``add(x, y)``, without annotations.
        self.call_signature = f"{options.name}{_bare(signature)}"
        #: (required, total) positional counts when positional calls need no bind() to check.
        self._arity = _simple_arity(signature)
        #: Seconds between two starts (None: no rate limit).
        self.rate_interval = (
            interval_of(options.rate_limit) if options.rate_limit is not None else None
        )
        check_scope(options.rate_limit_scope)
        functools.update_wrapper(self, fn)

    def __repr__(self) -> str:
        return f"<task {self.name}>"

    # -- handlers a task class may define (``@app.task(base=MyTask)``) --------------------------

    def on_success(
        self, retval: Any, task_id: str, args: list[Any], kwargs: dict[str, Any]
    ) -> None:
        """Called where the task ran, after it returned ``retval``."""

    def on_failure(
        self,
        exc: BaseException,
        task_id: str,
        args: list[Any],
        kwargs: dict[str, Any],
        traceback: str,
    ) -> None:
        """Called where the task ran, after it raised ``exc`` (and will not be retried)."""

    def on_retry(
        self,
        exc: BaseException,
        task_id: str,
        args: list[Any],
        kwargs: dict[str, Any],
        traceback: str,
    ) -> None:
        """Called where the task ran, when it is to run again (``self.retry()``, autoretry)."""

    @functools.cached_property
    def has_handlers(self) -> bool:
        """Whether this task's class defines any of the handlers above (worth calling)."""
        cls = type(self)
        return any(getattr(cls, name) is not getattr(Task, name)
                   for name in ("on_success", "on_failure", "on_retry"))

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        if self.options.bind:
            return self.fn(self, *args, **kwargs)
        return self.fn(*args, **kwargs)

    def run(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> R:
        """Run the function with decoded arguments (what a worker does)."""
        if self.options.bind:
            return self.fn(self, *args, **kwargs)
        return self.fn(*args, **kwargs)

    @property
    def request(self) -> Request:
        value = current_request.get()
        if isinstance(value, Request):
            return value
        request = value()
        current_request.set(request)
        return request

    # -- sending -------------------------------------------------------------------------------

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A signature of this call, to send later or as part of a workflow: partial (a chain
        or chord prepends the previous result to ``args``)."""
        from .canvas import Signature

        return Signature(self, args, kwargs, app=self.app)

    def si(self, *args: Any, **kwargs: Any) -> Signature:
        """An immutable signature: a chain or chord passes it no previous result."""
        from .canvas import Signature

        return Signature(self, args, kwargs, immutable=True, app=self.app)

    def signature(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
                  **options: Any) -> Signature:
        """A signature with options (Celery's ``task.signature(args, kwargs, **options)``)."""
        from .canvas import Signature, _check_options

        return Signature(self, args, kwargs, _check_options(options), app=self.app)

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult[R]:
        """Send the task with these arguments; return once the broker has stored it."""
        return self.apply_async(args, kwargs)

    @overload
    def apply_async(
        self,
        args: Sequence[Any] = ...,
        kwargs: Mapping[str, Any] | None = ...,
        *,
        queue: str | None = ...,
        countdown: float | None = ...,
        eta: datetime | None = ...,
        expires: float | datetime | None = ...,
        task_id: str | None = ...,
        time_limit: float | None = ...,
        soft_time_limit: float | None = ...,
        ignore_result: bool | None = ...,
        priority: int | None = ...,
        routing_key: str | None = ...,
        broadcast: Literal[False] | None = ...,
    ) -> AsyncResult[R]: ...

    @overload
    def apply_async(
        self,
        args: Sequence[Any] = ...,
        kwargs: Mapping[str, Any] | None = ...,
        *,
        queue: str | None = ...,
        countdown: float | None = ...,
        eta: datetime | None = ...,
        expires: float | datetime | None = ...,
        task_id: str | None = ...,
        time_limit: float | None = ...,
        soft_time_limit: float | None = ...,
        ignore_result: bool | None = ...,
        priority: int | None = ...,
        routing_key: str | None = ...,
        broadcast: Literal[True],
    ) -> BroadcastResult[R]: ...

    def apply_async(
        self,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        queue: str | None = None,
        countdown: float | None = None,
        eta: datetime | None = None,
        expires: float | datetime | None = None,
        task_id: str | None = None,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        ignore_result: bool | None = None,
        priority: int | None = None,
        routing_key: str | None = None,
        broadcast: bool | None = None,
    ) -> AsyncResult[R] | BroadcastResult[R]:
        """Send the task with options; return once the broker has confirmed the message.

        ``countdown`` (seconds) or ``eta`` (an aware datetime) delay it in the broker;
        ``expires`` (seconds or an aware datetime) skips it if no worker got to it in time.
        ``routing_key`` sends it by topic, to the queues bound to patterns it matches.
        ``broadcast=True`` (or the task's own): every worker of its queue that is up runs
        it once; the result is then a :class:`taskq.BroadcastResult`, by worker.
        """
        kwargs = dict(kwargs or {})
        self.check_arguments(args, kwargs)
        result: AsyncResult[R] | BroadcastResult[R] = self.app.send_task(
            self.name,
            args,
            kwargs,
            queue=queue or (self.options.queue if routing_key is None else None),
            countdown=countdown,
            eta=eta,
            expires=expires,
            task_id=task_id,
            time_limit=time_limit if time_limit is not None else self.options.time_limit,
            soft_time_limit=(
                soft_time_limit if soft_time_limit is not None else self.options.soft_time_limit
            ),
            ignore_result=self.options.ignore_result if ignore_result is None else ignore_result,
            priority=self.options.priority if priority is None else priority,
            routing_key=routing_key,
            broadcast=self.options.broadcast if broadcast is None else broadcast,
        )
        return result

    def apply(
        self,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        task_id: str | None = None,
    ) -> EagerResult[R]:
        """Run the task here and now, as a worker would (see :mod:`taskq.eager`): the
        arguments and the result go through the same encoding; returns its outcome."""
        from .eager import run_eagerly

        kwargs = dict(kwargs or {})
        self.check_arguments(args, kwargs)
        queue = self.options.queue or self.app.router.queue_for(self.name)
        return run_eagerly(
            self.app, self.name, args, kwargs, queue or self.app.config.default_queue,
            task_id or new_task_id(), time_limit=self.options.time_limit,
            soft_time_limit=self.options.soft_time_limit,
        )

    def delay_many(self, calls: Iterable[Sequence[Any]]) -> list[AsyncResult[R]]:
        """Send one task per item (each a tuple of positional arguments) in one batch.

        Returns once the broker has confirmed all of them (pipelined confirms, see
        :meth:`taskq.App.batch`); raises :class:`taskq.BatchPublishError` naming any it did not.
        Inside an ``app.batch()`` block they join that batch and go out when it ends.
        """
        with self.app.batch():
            return [self.apply_async(args) for args in calls]

    def check_arguments(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        """Raise TypeError now, before sending, if the arguments can't fit the function."""
        if not isinstance(args, (list, tuple)):
            raise TypeError(f"args for {self.name} must be a list or tuple, not {type(args)}")
        if not self.arguments_fit(args, kwargs):
            try:
                self.parameters.bind(*args, **kwargs)
            except TypeError as exc:
                raise TypeError(f"{self.call_signature}: {exc}") from None

    def arguments_fit(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
        """True if the arguments fit (False: ask ``signature.bind()``, which explains)."""
        arity = self._arity
        if arity is not None and not kwargs and arity[0] <= len(args) <= arity[1]:
            return True  # the common case, without inspect's bind() (several µs a call)
        try:
            self.parameters.bind(*args, **kwargs)
        except TypeError:
            return False
        return True

    # -- retrying (inside a running task) -------------------------------------------------------

    def retry(
        self,
        exc: BaseException | None = None,
        countdown: float | None = None,
        max_retries: int | None = None,
    ) -> Retry:
        """Schedule this task to run again; raises :class:`taskq.Retry` (``raise self.retry()``).

        Past ``max_retries`` it raises ``exc`` instead (the last error becomes the result),
        or :class:`MaxRetriesExceededError` when there is none.
        """
        request = self.request
        if request.called_directly:
            if exc is not None:
                raise exc
            raise MaxRetriesExceededError(f"{self.name}: retry() called outside a worker")
        limit = self.options.max_retries if max_retries is None else max_retries
        if limit is not None and request.retries >= limit:
            if exc is not None:
                raise exc
            raise MaxRetriesExceededError(f"{self.name}[{request.id}] reached max_retries={limit}")
        if countdown is None:
            countdown = (
                self.backoff(request.retries)
                if self.options.retry_backoff
                else (self.options.default_retry_delay)
            )
        raise Retry(countdown, exc)

    def backoff(self, retries: int) -> float:
        """Exponential backoff: factor * 2**retries, capped, with full jitter if enabled."""
        backoff = self.options.retry_backoff
        factor = 1.0 if backoff is True else float(backoff)
        countdown = min(self.options.retry_backoff_max, factor * math.pow(2, retries))
        if self.options.retry_jitter:
            countdown = random.uniform(0, countdown)
        return max(0.0, countdown)


def resolve_schedule(
    countdown: float | None, eta: datetime | None, expires: float | datetime | None
) -> tuple[datetime | None, float, datetime | None]:
    """Turn countdown/eta/expires into (eta, delay seconds, expires) with clear errors."""
    now = datetime.now(timezone.utc)
    if countdown is not None and eta is not None:
        raise ConfigurationError("pass countdown or eta, not both")
    if countdown is not None:
        if not isinstance(countdown, (int, float)) or countdown < 0 or math.isnan(countdown):
            raise ConfigurationError(
                f"countdown must be a number of seconds >= 0, not {countdown!r}"
            )
        eta = now + timedelta(seconds=countdown) if countdown > 0 else None
    elif eta is not None:
        eta = to_aware(eta, "eta")
    delay = max(0.0, (eta - now).total_seconds()) if eta is not None else 0.0
    expires_at: datetime | None = None
    if isinstance(expires, datetime):
        expires_at = to_aware(expires, "expires")
    elif expires is not None:
        if not isinstance(expires, (int, float)) or expires <= 0:
            raise ConfigurationError(f"expires must be seconds > 0 or a datetime, not {expires!r}")
        expires_at = now + timedelta(seconds=expires)
    return eta, delay, expires_at


def new_task_id() -> str:
    """A random (version 4) UUID, formatted as uuid4() would, in a third of the time."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
