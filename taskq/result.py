"""AsyncResult: the caller's handle on a task's outcome."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from . import states
from .errors import ResultUnavailable, TimeoutError
from .message import Registered, exception_from_wire

if TYPE_CHECKING:
    from .replies import Gathering, Pending, ReplyConsumer

_NONE_REGISTERED: Registered = {}

R = TypeVar("R")


class AsyncResult(Generic[R]):
    """A task's outcome, once the worker has reported it.

    Wait with :meth:`get` from any thread; results of many tasks may be waited on in any order.
    A result that arrives before anyone waits is kept here until asked for.
    """

    def __init__(
        self,
        task_id: str,
        task_name: str,
        pending: Pending | None,
        consumer: ReplyConsumer | None,
        exceptions: Registered = _NONE_REGISTERED,
    ) -> None:
        self.id = task_id
        self.task_name = task_name
        self._pending = pending
        self._consumer = consumer
        #: The app's registered exception types, rebuilt as themselves on failure.
        self._exceptions = exceptions
        self._exception: BaseException | None = None

    def __repr__(self) -> str:
        return f"<AsyncResult {self.task_name}[{self.id}] {self.state}>"

    @property
    def state(self) -> str:
        """PENDING until the outcome arrives (RETRY while retrying), then SUCCESS or FAILURE."""
        pending = self._pending
        if pending is None:
            return states.PENDING
        if not pending.done and self._consumer is not None:
            self._consumer.poll()  # file whatever already arrived
        return pending.state

    def ready(self) -> bool:
        return self.state in states.READY_STATES

    def successful(self) -> bool:
        return self.state == states.SUCCESS

    def failed(self) -> bool:
        return self.state == states.FAILURE

    @property
    def result(self) -> R | BaseException | None:
        """The return value, or the exception if the task failed, or None if not ready."""
        meta = self._meta()
        if meta is None:
            return None
        if meta.get("status") == states.FAILURE:
            return self._failure(meta)
        return cast(R, meta.get("result"))

    @property
    def traceback(self) -> str | None:
        """The worker's formatted traceback of a failed task."""
        meta = self._meta()
        return meta.get("traceback") if meta else None

    def _meta(self) -> dict[str, Any] | None:
        pending = self._pending
        if pending is None:
            return None
        if not pending.done and self._consumer is not None:
            self._consumer.poll()
        return pending.meta if pending.done else None

    def _failure(self, meta: dict[str, Any]) -> BaseException:
        if self._exception is None:
            self._exception = exception_from_wire(
                meta.get("result"), meta.get("traceback"), self._exceptions
            )
        return self._exception

    def get(self, timeout: float | None = None, propagate: bool = True) -> R:
        """Wait for the outcome and return the task's value.

        Raises the task's exception if it failed (builtins as themselves, other types as
        :class:`taskq.RemoteError`); with ``propagate=False`` returns it instead.
        Raises :class:`taskq.TimeoutError` if ``timeout`` seconds pass first.
        """
        pending = self._pending
        if pending is None:
            raise ResultUnavailable(
                f"task {self.task_name}[{self.id}] was sent with ignore_result: no result "
                "will come back"
            )
        if not pending.done:
            self._wait(pending, timeout)
        meta = pending.meta
        assert meta is not None
        if meta.get("status") == states.FAILURE:
            exc = self._failure(meta)
            if propagate:
                raise exc
            return exc  # type: ignore[return-value]
        return cast(R, meta.get("result"))

    def revoke(self, terminate: bool = False) -> None:
        """Revoke the task (see :meth:`taskq.control.Control.revoke`): a worker that gets it
        does not run it; with ``terminate`` a run under way is stopped. This handle's
        :meth:`get` raises :class:`taskq.TaskRevoked` from now on."""
        consumer = self._consumer
        if consumer is None:
            raise ResultUnavailable(
                f"task {self.task_name}[{self.id}]: this handle has no broker; use "
                "app.revoke(task_id)"
            )
        from .control import Control
        from .errors import TaskRevoked
        from .replies import _failure_meta

        Control(consumer.broker, consumer.config).revoke(self.id, terminate=terminate)
        pending = self._pending
        if pending is not None and not pending.done:
            pending.resolve(_failure_meta(self.id, TaskRevoked(
                f"task {self.task_name}[{self.id}] was revoked")))

    def _wait(self, pending: Pending, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._consumer is not None:
            self._consumer.wait(pending, deadline)
        if not pending.done:
            raise TimeoutError(
                f"task {self.task_name}[{self.id}] gave no result within {timeout:g}s (state "
                f"{pending.state}); it may still be queued or running: get() can be called "
                "again"
            )


def _gathered(task_id: str, meta: Mapping[str, Any] | None) -> Gathering | None:
    from .replies import Gathering

    if meta is None:
        return None
    gathering = Gathering(task_id)
    gathering.resolve({**meta, "worker": "eager"})
    return gathering


class BroadcastResult(Generic[R]):
    """The results of a broadcast task, one per worker that ran it, keyed by worker name.

    How many workers will answer is not known up front (those up when it was sent): ``get``
    collects for ``timeout`` seconds, or until ``workers`` have answered.
    """

    def __init__(
        self,
        task_id: str,
        task_name: str,
        gathering: Gathering | None,
        consumer: ReplyConsumer | None,
        exceptions: Registered = _NONE_REGISTERED,
    ) -> None:
        self.id = task_id
        self.task_name = task_name
        self._gathering = gathering
        self._consumer = consumer
        self._exceptions = exceptions

    def __repr__(self) -> str:
        answered = len(self._gathering.by_worker) if self._gathering is not None else 0
        return f"<BroadcastResult {self.task_name}[{self.id}] {answered} answered>"

    def get(
        self, timeout: float = 5.0, *, workers: int | None = None, propagate: bool = True
    ) -> dict[str, R]:
        """Wait ``timeout`` seconds (less if ``workers`` answered), then return each
        answering worker's value by worker name. A failure is raised (the first, by worker
        name) unless ``propagate=False``, which puts the exception in its place."""
        gathering = self._gathering
        if gathering is None:
            raise ResultUnavailable(
                f"broadcast {self.task_name}[{self.id}] was sent with ignore_result: no result "
                "will come back"
            )
        gathering.expected = workers
        if workers is not None and len(gathering.by_worker) >= workers:
            gathering.done = True
        if self._consumer is not None and not gathering.done:
            self._consumer.wait(gathering, time.monotonic() + timeout)
        values: dict[str, Any] = {}
        for worker, meta in sorted(gathering.by_worker.items()):
            if meta.get("status") == states.FAILURE:
                exc = exception_from_wire(meta.get("result"), meta.get("traceback"),
                                          self._exceptions)
                if propagate:
                    raise exc
                values[worker] = exc
            else:
                values[worker] = meta.get("result")
        return values


class EagerResult(AsyncResult[R]):
    """The outcome of a task run in the calling process (``App(eager=True)``, ``task.apply()``):
    the same API as :class:`AsyncResult`, ready at once. The value and any failure went
    through the same encoding as a worker's result (a tuple comes back a list, an exception
    type that is not registered comes back :class:`taskq.RemoteError`)."""

    def __init__(
        self,
        task_id: str,
        task_name: str,
        meta: Mapping[str, Any] | None,
        exceptions: Registered = _NONE_REGISTERED,
    ) -> None:
        from .replies import Pending

        pending = None
        if meta is not None:  # None: sent with ignore_result, as a worker would keep none
            pending = Pending(task_id)
            pending.resolve(dict(meta))
        super().__init__(task_id, task_name, pending, None, exceptions)

    def __repr__(self) -> str:
        return f"<EagerResult {self.task_name}[{self.id}] {self.state}>"

    def as_broadcast(self) -> BroadcastResult[R]:
        """The same outcome as a broadcast's, run by one worker here (named "eager")."""
        meta = self._pending.meta if self._pending is not None else None
        return BroadcastResult(self.id, self.task_name, _gathered(self.id, meta), None,
                               self._exceptions)
