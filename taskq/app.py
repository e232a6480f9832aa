"""App: configuration, the task registry, and the wiring from ``.delay()`` to the broker."""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Concatenate, Literal, TypeVar, overload

from .broker import Broker, broker_for
from .config import Config, check_priority
from .control import Control
from .errors import BatchPublishError, ConfigurationError
from .hooks import Hooks
from .message import Envelope, task_envelope
from .producer import Producer
from .replies import ReplyConsumer
from .result import AsyncResult, BroadcastResult
from .routing import Router, check_routing_key, signature_destination
from .schedules import Entry, make_entry
from .task import P, R, Task, TaskOptions, main_module_name, new_task_id, resolve_schedule

log = logging.getLogger("taskq")

E = TypeVar("E", bound=Exception)
F = TypeVar("F", bound=Callable[..., Any])


class App:
    """A taskq application: where tasks are registered and how they reach the broker.

    ``App()`` reads the broker URL from ``$TASKQ_BROKER_URL`` (default: the embedded broker,
    ``sqlite:///taskq.db`` in the working directory; ``amqp://...`` for RabbitMQ).
    Other settings are keyword arguments (see :class:`taskq.Config`). Nothing connects until
    the first task is sent, so creating an App at import time is cheap and fork-safe.
    """

    def __init__(
        self,
        broker_url: str | None = None,
        *,
        default_queue: str = "taskq",
        main: str | None = None,
        routes: Mapping[str, str | Mapping[str, Any]] | None = None,
        exceptions: Iterable[type[Exception]] = (),
        **settings: Any,
    ) -> None:
        self.config = Config.from_settings(broker_url, default_queue=default_queue, **settings)
        #: Module name used for tasks defined in a script run as ``__main__``.
        self.main = main
        #: Which queue a task goes to when neither the call nor the task names one.
        self.router = Router(routes or {})
        #: Exception types rebuilt as themselves in a caller (see :meth:`exception`).
        self.exceptions: dict[tuple[str, str], type[BaseException]] = {}
        for cls in exceptions:
            self.exception(cls)
        self.tasks: dict[str, Task[Any, Any]] = {}
        #: Periodic tasks, by entry name (see :meth:`schedule`).
        self.schedule_entries: dict[str, Entry] = {}
        #: Functions called at points of a worker's and a task's life (see :mod:`taskq.hooks`).
        self.hooks = Hooks()
        self._lock = threading.RLock()
        self._broker: Broker | None = None
        self._producer: Producer | None = None
        self._replies: ReplyConsumer | None = None
        self._local = threading.local()  # the batch being collected, per thread
        _all_apps.add(self)

    def __repr__(self) -> str:
        return f"<taskq.App {self.config.display_url} tasks={len(self.tasks)}>"

    # -- registering tasks --------------------------------------------------------------------

    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(
        self,
        *,
        name: str | None = ...,
        queue: str | None = ...,
        bind: Literal[False] = ...,
        ignore_result: bool = ...,
        max_retries: int | None = ...,
        default_retry_delay: float = ...,
        autoretry_for: Sequence[type[BaseException]] = ...,
        retry_backoff: float | bool = ...,
        retry_backoff_max: float = ...,
        retry_jitter: bool = ...,
        time_limit: float | None = ...,
        soft_time_limit: float | None = ...,
        priority: int | None = ...,
        rate_limit: str | float | None = ...,
        rate_limit_scope: Literal["worker", "global"] = ...,
        broadcast: bool = ...,
        base: type[Task[Any, Any]] = ...,
    ) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    @overload
    def task(
        self,
        *,
        name: str | None = ...,
        queue: str | None = ...,
        bind: Literal[True],
        ignore_result: bool = ...,
        max_retries: int | None = ...,
        default_retry_delay: float = ...,
        autoretry_for: Sequence[type[BaseException]] = ...,
        retry_backoff: float | bool = ...,
        retry_backoff_max: float = ...,
        retry_jitter: bool = ...,
        time_limit: float | None = ...,
        soft_time_limit: float | None = ...,
        priority: int | None = ...,
        rate_limit: str | float | None = ...,
        rate_limit_scope: Literal["worker", "global"] = ...,
        broadcast: bool = ...,
        base: type[Task[Any, Any]] = ...,
    ) -> Callable[[Callable[Concatenate[Any, P], R]], Task[P, R]]: ...

    def task(self, *fns: Callable[..., Any], **options: Any) -> Any:
        """Register a function as a task: ``@app.task`` or ``@app.task(name=..., queue=...)``."""
        if len(fns) > 1 or (fns and options):
            raise ConfigurationError("use @app.task or @app.task(option=...), with keywords only")
        if fns:
            return self._register(fns[0], options)
        return lambda f: self._register(f, options)

    def _register(self, fn: Callable[..., Any], options: Mapping[str, Any]) -> Task[Any, Any]:
        if not callable(fn):
            raise ConfigurationError(f"@task needs a function, got {fn!r}")
        opts = dict(options)
        if "autoretry_for" in opts:
            opts["autoretry_for"] = tuple(opts["autoretry_for"])
        base = opts.pop("base", Task)
        if not (isinstance(base, type) and issubclass(base, Task)):
            raise ConfigurationError(
                f"@task(base=...) must be a subclass of taskq.Task, not {base!r}")
        name = opts.pop("name", None) or self._default_name(fn)
        check_priority(opts.get("priority"))
        try:
            task_options = TaskOptions(name=name, **opts)
        except TypeError as exc:
            raise ConfigurationError(f"@task({', '.join(options)}): {exc}") from None
        existing = self.tasks.get(name)
        if existing is not None and existing.fn is not fn and _source(existing.fn) != _source(fn):
            raise ConfigurationError(
                f"two different functions are registered as task {name!r}; give one a name= "
            )
        task: Task[Any, Any] = base(self, fn, task_options)
        self.tasks[name] = task
        return task

    def _default_name(self, fn: Callable[..., Any]) -> str:
        module = fn.__module__
        if module == "__main__":
            module = self.main or main_module_name()
        return f"{module}.{fn.__qualname__}"

    def exception(self, cls: type[E]) -> type[E]:
        """Register an exception type (also as ``@app.exception`` on its class): a task's
        failure of exactly this type is raised in the caller as itself, rebuilt from its
        arguments, so ``except MyError:`` works. Other types stay :class:`taskq.RemoteError`.
        Nothing a message names is ever imported: only registered classes are looked up."""
        if not (isinstance(cls, type) and issubclass(cls, Exception)):
            raise ConfigurationError(
                f"exceptions must be Exception subclasses (to rebuild in callers), not {cls!r}"
            )
        module = cls.__module__
        self.exceptions[(module, cls.__qualname__)] = cls
        if module == "__main__":  # a worker imports the script under its module name
            self.exceptions[(self.main or main_module_name(), cls.__qualname__)] = cls
        return cls

    # -- periodic tasks (see taskq.schedules and taskq.beat) ------------------------------------

    def schedule(
        self,
        sig: Any,
        *,
        every: float | None = None,
        cron: str | None = None,
        tz: str | None = None,
        name: str | None = None,
        missed: Literal["late", "skip"] = "late",
    ) -> Entry:
        """Send the signature ``sig`` (``task.s(...)``) periodically: ``every`` seconds, or at
        the times of ``cron`` (``"0 7 * * mon-fri"``, in time zone ``tz``, default UTC; needs
        ``pip install 'taskq[cron]'``). Run by ``taskq beat -A app`` or ``taskq worker
        --beat``: once per due time, however many beats run. ``name``: the entry's, unique
        in the app (default: the task's name). ``missed``: for due times that passed while no
        beat ran, ``"late"`` fires once, for the latest of them; ``"skip"`` fires none."""
        entry = make_entry(sig, every=every, cron=cron, tz=tz, name=name, missed=missed)
        if entry.name in self.schedule_entries:
            raise ConfigurationError(
                f"two periodic tasks are named {entry.name!r} in this app: give one a name= "
                "(app.schedule(..., name='...'))"
            )
        self.envelope_for(entry.sig, task_id="check")  # arguments that can't be sent: now
        self.schedule_entries[entry.name] = entry
        return entry

    # -- hooks (see taskq.hooks: where each is called, with what) ------------------------------

    def on_worker_start(self, fn: F) -> F:
        """``@app.on_worker_start``: ``fn()`` once in a worker's main process, before slots."""
        self.hooks.worker_start.append(fn)
        return fn

    def on_slot_start(self, fn: F) -> F:
        """``@app.on_slot_start``: ``fn()`` in each process (or slot thread) that runs tasks,
        before its first task: where to open database pools and clients."""
        self.hooks.slot_start.append(fn)
        return fn

    def on_send(self, fn: F) -> F:
        """``@app.on_send``: ``fn(headers)`` for each task message sent from this process; what
        it adds to ``headers`` reaches the task (``self.request.headers``)."""
        self.hooks.send.append(fn)
        return fn

    def before_task(self, fn: F) -> F:
        """``@app.before_task``: ``fn(run)`` (a :class:`taskq.TaskRun`) before each run."""
        self.hooks.before_task.append(fn)
        return fn

    def after_task(self, fn: F) -> F:
        """``@app.after_task``: ``fn(run)`` after each run, with its outcome and runtime."""
        self.hooks.after_task.append(fn)
        return fn

    def on_failure(self, fn: F) -> F:
        """``@app.on_failure``: ``fn(run)`` after a run that raised and will not be retried."""
        self.hooks.failure.append(fn)
        return fn

    # -- sending ----------------------------------------------------------------------------------

    @property
    def broker(self) -> Broker:
        if self._broker is None:
            with self._lock:
                if self._broker is None:
                    self._broker = broker_for(self.config)
        return self._broker

    @property
    def producer(self) -> Producer:
        if self._producer is None:
            with self._lock:
                if self._producer is None:
                    self._producer = Producer(self.broker, self.config, lambda: self._replies)
        return self._producer

    @property
    def control(self) -> Control:
        """Remote control of the workers (Celery's protocol): ping, inspect, revoke, events."""
        return Control(self.broker, self.config)

    def revoke(self, task_id: str | Sequence[str], *, terminate: bool = False) -> None:
        """Revoke tasks by id: see :meth:`taskq.control.Control.revoke`."""
        self.control.revoke(task_id, terminate=terminate)

    @property
    def replies(self) -> ReplyConsumer:
        if self._replies is None:
            with self._lock:
                if self._replies is None:
                    self._replies = ReplyConsumer(self.broker, self.config)
                    _close_at_exit(self)
        return self._replies

    @overload
    def send_task(
        self,
        name: str,
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
        ignore_result: bool = ...,
        priority: int | None = ...,
        routing_key: str | None = ...,
        broadcast: Literal[False] = ...,
    ) -> AsyncResult[Any]: ...

    @overload
    def send_task(
        self,
        name: str,
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
        ignore_result: bool = ...,
        priority: int | None = ...,
        routing_key: str | None = ...,
        broadcast: Literal[True],
    ) -> BroadcastResult[Any]: ...

    @overload
    def send_task(
        self,
        name: str,
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
        ignore_result: bool = ...,
        priority: int | None = ...,
        routing_key: str | None = ...,
        broadcast: bool = ...,
    ) -> AsyncResult[Any] | BroadcastResult[Any]: ...

    def send_task(
        self,
        name: str,
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
        ignore_result: bool = False,
        priority: int | None = None,
        routing_key: str | None = None,
        broadcast: bool = False,
    ) -> Any:
        """Send a task by name (it need not be defined in this process); its AsyncResult.

        ``routing_key`` sends it by topic instead of to a queue: to every queue bound to a
        pattern the key matches (``taskq worker -Q orders --bind 'eu.orders.*'``); an error
        if none is. ``broadcast=True`` sends it to every worker of its queue that is up now,
        each of which runs it once: then a :class:`taskq.BroadcastResult` collects their
        results by worker.
        """
        priority = check_priority(priority)
        if countdown is None and eta is None and expires is None:
            delay, expires_at = 0.0, None
        else:
            eta, delay, expires_at = resolve_schedule(countdown, eta, expires)
        task_id = task_id or new_task_id()
        config = self.config
        queue, routing_key = self._destination(name, queue, routing_key, broadcast, delay)
        if config.eager:
            from .eager import run_eagerly  # the worker's own code path: loaded only if used

            eager = run_eagerly(self, name, args, kwargs or {}, queue, task_id, ignore_result,
                                time_limit=time_limit, soft_time_limit=soft_time_limit)
            return eager.as_broadcast() if broadcast else eager
        pending: Any = None
        reply_to = None
        if not ignore_result:
            replies = self.replies
            pending = replies.gather(task_id) if broadcast else replies.expect(task_id)
            reply_to = replies.queue
        try:
            envelope = task_envelope(
                task_id=task_id,
                name=name,
                args=tuple(args),
                kwargs=kwargs or {},
                queue=queue,
                serializer=config.serializer,
                reply_to=reply_to,
                eta=eta,
                expires=expires_at,
                delay=delay,
                time_limit=time_limit,
                soft_time_limit=soft_time_limit,
                ignore_result=ignore_result,
                priority=priority,
                extra_headers=self.hooks.send_headers(),
                routing_key=routing_key,
                broadcast=broadcast,
            )
        except BaseException:
            if pending is not None:
                self.replies.forget(task_id)
            raise
        result: Any = (BroadcastResult if broadcast else AsyncResult)(
            task_id, name, pending, self._replies, self.exceptions
        )
        self.dispatch(envelope, [task_id] if pending is not None else [])
        return result

    def dispatch(self, envelope: Envelope, expected: Sequence[str] = ()) -> None:
        """Send a message built here (into the batch being collected, if any); on failure,
        stop waiting for the results ``expected`` (their ids were registered first)."""
        batch: Batch | None = getattr(self._local, "batch", None)
        try:
            if batch is not None:
                self.producer.check_size(envelope)
                batch.envelopes.append(envelope)
                if list(expected) != [envelope.task_id]:  # a workflow's: another id waited on
                    batch.expected[envelope.task_id] = list(expected)
                return
            self.producer.send(envelope)
        except BaseException:
            for task_id in expected:
                self.replies.forget(task_id)
            raise

    def envelope_for(
        self,
        sig: Mapping[str, Any],
        *,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        task_id: str | None = None,
        reply_to: str | None = None,
        embed: Mapping[str, Any] | None = None,
        headers: Mapping[str, Any] | None = None,
        once: bool = False,
    ) -> Envelope:
        """The message that sends signature ``sig`` (a :class:`taskq.canvas.Signature` or
        its dict form), not sent: its options, else its task's own (if registered here),
        else the app's. ``args``/``kwargs`` replace the signature's; ``task_id`` its own."""
        name = str(sig.get("task") or "")
        if not name:
            raise ConfigurationError(f"a signature names no task: {dict(sig)!r}")
        options: Mapping[str, Any] = sig.get("options") or {}
        own = self.tasks.get(name)
        defaults = own.options if own is not None else None

        def option(key: str) -> Any:
            value = options.get(key)
            if value is None and defaults is not None:
                value = getattr(defaults, key, None)
            return value

        countdown, eta, expires = options.get("countdown"), options.get("eta"), \
            options.get("expires")
        if isinstance(eta, str):
            eta = datetime.fromisoformat(eta)
        if countdown is None and eta is None and expires is None:
            delay, expires_at = 0.0, None
        else:
            eta, delay, expires_at = resolve_schedule(countdown, eta, expires)
        queue, routing_key = signature_destination(options)
        queue, routing_key = self._destination(
            name, queue or (defaults.queue if defaults is not None else None), routing_key,
            False, delay)
        task_id = task_id or options.get("task_id") or new_task_id()
        extra = self.hooks.send_headers()
        if headers:
            extra = {**(extra or {}), **headers}
        links = {k: v for k, v in (("callbacks", options.get("link")),
                                   ("errbacks", options.get("link_error"))) if v}
        if links:  # Celery's link / link_error: signatures sent after this one
            embed = {**(embed or {}), **links}
        return task_envelope(
            task_id=task_id,
            name=name,
            args=tuple(sig.get("args") or () if args is None else args),
            kwargs=dict(sig.get("kwargs") or {} if kwargs is None else kwargs),
            queue=queue,
            serializer=self.config.serializer,
            reply_to=reply_to,
            eta=eta,
            expires=expires_at,
            delay=delay,
            time_limit=option("time_limit"),
            soft_time_limit=option("soft_time_limit"),
            ignore_result=bool(option("ignore_result")),
            priority=check_priority(option("priority")),
            extra_headers=extra,
            routing_key=routing_key,
            embed=embed,
            once=once,
        )

    def _destination(
        self, name: str, queue: str | None, routing_key: str | None, broadcast: bool,
        delay: float,
    ) -> tuple[str, str | None]:
        """(queue, routing key) of a task: the call's, else its route's, else the default."""
        if routing_key is not None:
            routing_key = check_routing_key(routing_key)
            if queue is not None:
                raise ConfigurationError("pass queue= or routing_key=, not both")
        elif queue is None and (route := self.router.route_for(name)) is not None:
            queue, routing_key = route.queue, route.routing_key
        if routing_key is not None and broadcast:
            raise ConfigurationError(
                "a broadcast goes to the workers of a queue: pass queue=, not routing_key=")
        if (routing_key is not None or broadcast) and delay > 0:
            raise ConfigurationError(
                f"a task sent {'as a broadcast' if broadcast else 'by routing_key'} can't be "
                "delayed (countdown/eta): send it to its queue (queue=...) to delay it"
            )
        return queue or self.config.default_queue, routing_key

    @contextmanager
    def batch(self) -> Iterator[Batch]:
        """Send every task of the block together, with pipelined publisher confirms.

        ``.delay()`` inside the block returns its AsyncResult at once; the messages go out
        when the block ends, and the block returns only once the broker has confirmed every
        one of them. If some were not confirmed it raises :class:`taskq.BatchPublishError`
        naming them (the others are queued). If the block raises, nothing is sent.
        Many times faster than a ``.delay()`` loop, which waits for each confirm in turn.
        """
        outer: Batch | None = getattr(self._local, "batch", None)
        if outer is not None:  # nested: part of the outer batch
            yield outer
            return
        batch = Batch()
        self._local.batch = batch
        try:
            yield batch
        except BaseException:
            self._forget(batch, batch.envelopes)
            raise
        finally:
            self._local.batch = None
        self._send_batch(batch)

    def _send_batch(self, batch: Batch) -> None:
        envelopes = batch.envelopes
        if not envelopes:
            return
        try:
            refused = self.producer.send_many(envelopes)
        except BatchPublishError as exc:
            failed = set(exc.failed)
            self._forget(batch, [e for e in envelopes if e.task_id in failed])
            raise
        if refused:
            self._forget(batch, [e for e in envelopes if e.task_id in refused])
            examples = "; ".join(f"{tid}: {why}" for tid, why in list(refused.items())[:3])
            raise BatchPublishError(
                f"{len(refused)} of {len(envelopes)} tasks were not queued ({examples})",
                failed=list(refused),
            )

    def _forget(self, batch: Batch, envelopes: list[Envelope]) -> None:
        if self._replies is not None:
            for envelope in envelopes:
                for task_id in batch.expected.get(envelope.task_id, (envelope.task_id,)):
                    self._replies.forget(task_id)

    def _after_fork_in_child(self) -> None:
        """Right after ``os.fork()``, in the child: fresh locks and links. Any lock another
        parent thread held at the fork stays held forever in the child; taking it would hang."""
        self._lock = threading.RLock()
        if self._producer is not None:
            self._producer._after_fork()
        if self._replies is not None:
            self._replies.after_fork()

    def close(self) -> None:
        """Close connections and delete this process's reply queue. Safe to call twice."""
        if self._replies is not None:
            self._replies.close()
        if self._producer is not None:
            self._producer.close()


class Batch:
    """The task messages collected by ``with app.batch():``, sent when the block ends."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []
        #: Task id of a message -> the results waited on through it, where that is not its
        #: own id (forgotten if it is not sent).
        self.expected: dict[str, list[str]] = {}

    def __len__(self) -> int:
        return len(self.envelopes)


def _source(fn: Callable[..., Any]) -> tuple[str, int]:
    code = getattr(fn, "__code__", None)
    return (getattr(code, "co_filename", ""), getattr(code, "co_firstlineno", 0))


_open_apps: weakref.WeakSet[App] = weakref.WeakSet()
#: Every App of this process, to give each fresh state in a forked child.
_all_apps: weakref.WeakSet[App] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _default_lock
    _default_lock = threading.Lock()
    for app in list(_all_apps):
        app._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _close_at_exit(app: App) -> None:
    _open_apps.add(app)


@atexit.register
def _close_open_apps() -> None:
    pid = os.getpid()
    for app in list(_open_apps):
        try:
            if app._replies is not None and app._replies._pid == pid:
                app.close()
        except Exception:
            pass


# -- a default app, for small scripts ---------------------------------------------------------

_default_app: App | None = None
_default_lock = threading.Lock()


def default_app() -> App:
    """The app ``taskq.task`` registers on: built from the environment on first use."""
    global _default_app
    if _default_app is None:
        with _default_lock:
            if _default_app is None:
                _default_app = App()
    return _default_app


@overload
def task(fn: Callable[P, R], /) -> Task[P, R]: ...
@overload
def task(**options: Any) -> Callable[[Callable[P, R]], Task[P, R]]: ...
def task(*fns: Callable[..., Any], **options: Any) -> Any:
    """``@taskq.task``: register on the default app (``$TASKQ_BROKER_URL``)."""
    return default_app().task(*fns, **options)
