"""Waiting on many results at once: :func:`gather` (their values, in order) and
:func:`as_completed` (each handle as it finishes).

Neither polls handle after handle. Every watched :class:`~taskq.replies.Pending` gets a small
notice in its ``wakers``: when the reply consumer files that result (in whichever thread), the
notice puts the Pending in one inbox and marks the inbox done. The caller waits on the inbox
with :meth:`ReplyConsumer.wait`, exactly as ``AsyncResult.get`` waits on one Pending, so the
calling thread reads the reply connection itself when nobody else does and sleeps on it
otherwise. Each wake-up costs the results that arrived, not the number still outstanding:
10,000 handles cost 10,000 notices, once.
"""

from __future__ import annotations

import collections
import contextlib
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from .errors import ResultUnavailable, TimeoutError
from .replies import Pending
from .result import AsyncResult

if TYPE_CHECKING:
    from click._termui_impl import ProgressBar

R = TypeVar("R")

#: How often a progress bar is redrawn at most, and at least while nothing arrives (seconds).
REDRAW_EVERY = 0.1
REFRESH_IDLE = 0.5


class _Inbox(Pending):
    """Done as soon as any watched result is filed: what the caller waits on."""

    __slots__ = ("arrived", "event")

    def __init__(self) -> None:
        super().__init__("")
        self.arrived: collections.deque[Pending] = collections.deque()
        #: For handles no reply consumer drives (none today: such handles are always ready).
        self.event = threading.Event()

    def arrive(self, pending: Pending) -> None:
        self.arrived.append(pending)  # before ``done``: take() never misses one
        self.done = True
        self.event.set()
        for waker in tuple(self.wakers):
            waker.wake()

    def take(self) -> list[Pending]:
        self.done = False  # before emptying: one filed from now on sets it again
        self.event.clear()
        taken = []
        while self.arrived:
            taken.append(self.arrived.popleft())
        return taken


class _Notice:
    """Sits in one Pending's ``wakers``; tells the inbox when that result is filed."""

    __slots__ = ("inbox", "pending")

    def __init__(self, inbox: _Inbox, pending: Pending) -> None:
        self.inbox = inbox
        self.pending = pending

    def wake(self) -> None:
        self.inbox.arrive(self.pending)


class _Watch:
    """Many handles waited on together; a handle listed twice is one Pending watched once."""

    def __init__(self, handles: list[AsyncResult[Any]], what: str) -> None:
        self.handles = handles
        self.what = what
        #: id(pending) -> the positions of its handles in ``handles``, until it is reported.
        self.outstanding: dict[int, list[int]] = {}
        self.order: list[Pending] = []  # each Pending once, by its first position
        for position, handle in enumerate(handles):
            pending = handle._pending
            if pending is None:
                raise ResultUnavailable(
                    f"{what}: task {handle.task_name}[{handle.id}] (position {position}) was "
                    "sent with ignore_result: no result will come back"
                )
            positions = self.outstanding.setdefault(id(pending), [])
            if not positions:
                self.order.append(pending)
            positions.append(position)
        self._cursor = 0  # order[:cursor] are all reported
        self._inbox = _Inbox()
        self._notices: list[_Notice] = []

    def __enter__(self) -> _Watch:
        for pending in self.order:
            notice = _Notice(self._inbox, pending)
            pending.wakers.append(notice)  # before looking at ``done``, as ReplyConsumer.wait
            self._notices.append(notice)
        for pending in self.order:  # those filed already, in list order
            if pending.done:
                self._inbox.arrive(pending)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for notice in self._notices:
            with contextlib.suppress(ValueError):  # gone already: nothing to undo
                notice.pending.wakers.remove(notice)
        self._notices.clear()

    def remaining(self) -> int:
        """How many positions of the input have no result yet."""
        return sum(len(positions) for positions in self.outstanding.values())

    def wait(self, deadline: float | None) -> list[list[int]] | None:
        """Block until results arrive: the positions of each, in order of arrival; [] when all
        are reported; None if ``deadline`` (monotonic) passed first."""
        while self.outstanding:
            reported = [positions for pending in self._inbox.take()
                        if (positions := self.outstanding.pop(id(pending), None)) is not None]
            if reported:
                return reported
            if deadline is not None and time.monotonic() >= deadline:
                return None
            self._sleep(deadline)
        return []

    def _sleep(self, deadline: float | None) -> None:
        """Until the inbox is done or ``deadline``: on the reply consumer of the first handle
        still outstanding. Results for handles of another App's consumer are filed by that
        consumer's keeper thread meanwhile, and wake us all the same."""
        first, handle = self._first_outstanding()
        consumer = handle._consumer
        inbox = self._inbox
        # What ReplyConsumer.check_health reports, should the broker stay away too long.
        inbox.task_id, inbox.pid = first.task_id, first.pid
        if consumer is not None:
            consumer.wait(inbox, deadline)
        else:
            inbox.event.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def _first_outstanding(self) -> tuple[Pending, AsyncResult[Any]]:
        """The Pending still outstanding that comes first in the list, and its handle."""
        order = self.order
        while id(order[self._cursor]) not in self.outstanding:
            self._cursor += 1
        first = order[self._cursor]
        return first, self.handles[self.outstanding[id(first)][0]]

    def timed_out(self, timeout: float | None) -> TimeoutError:
        left = self.remaining()
        first, handle = self._first_outstanding()
        return TimeoutError(
            f"{self.what}: {left} of {len(self.handles)} tasks gave no result within "
            f"{timeout or 0:g}s (the first still pending: {handle.task_name}[{handle.id}], "
            f"state {first.state}); they may still be "
            f"queued or running: call {self.what}() again"
        )


class _Progress:
    """click's progress bar on stderr, only when stderr is a terminal (else nothing at all:
    click would still print the label once)."""

    def __init__(self, total: int, wanted: bool) -> None:
        self.total = total
        self.done = self.failed = self._unshown = 0
        self.started = self._drawn = time.monotonic()
        self._bar: ProgressBar[int] | None = None
        if wanted and total and sys.stderr.isatty():
            import click

            self._bar = click.progressbar(
                length=total, file=sys.stderr, label=self._label(),
                bar_template="[%(bar)s]  %(label)s  %(info)s", show_percent=False,
            )

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._draw()
            self._bar.__exit__(exc_type, exc, tb)

    @property
    def shown(self) -> bool:
        return self._bar is not None

    def count(self, done: int, failed: int) -> None:
        self.done += done
        self.failed += failed
        self._unshown += done
        if self._bar is not None and time.monotonic() - self._drawn >= REDRAW_EVERY:
            self._draw()

    def refresh(self) -> None:
        """While nothing arrives: the rate keeps falling."""
        if self._bar is not None:
            self._draw()

    def _label(self) -> str:
        rate = self.done / max(time.monotonic() - self.started, 1e-9)
        return f"{self.done}/{self.total} done, {self.failed} failed, {rate:.1f} tasks/s"

    def _draw(self) -> None:
        bar = self._bar
        assert bar is not None
        self._drawn = time.monotonic()
        bar.label = self._label()
        steps, self._unshown = self._unshown, 0
        if steps:
            bar.update(steps)
        else:
            bar.render_progress()


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


@overload
def gather(results: Iterable[AsyncResult[R]], *, timeout: float | None = None,
           propagate: Literal[True] = True, progress: bool = False) -> list[R]: ...


@overload
def gather(results: Iterable[AsyncResult[R]], *, timeout: float | None = None,
           propagate: bool, progress: bool = False) -> list[R | BaseException]: ...


def gather(results: Iterable[AsyncResult[Any]], *, timeout: float | None = None,
           propagate: bool = True, progress: bool = False) -> list[Any]:
    """Wait for every result; their values in the order of ``results``.

    A failure is raised as soon as it arrives, without waiting for the rest (if several are
    known at once, e.g. already in when gather is called, the first of them in list order);
    with ``propagate=False`` each exception takes its task's place in the list instead.
    ``timeout`` bounds the whole call: :class:`taskq.TimeoutError` says how many are still
    pending (those tasks may still run; gather can be called again with the same handles).
    ``progress=True`` draws a progress bar on stderr if it is a terminal, with the counts of
    done and failed and the rate; nothing otherwise.

    A handle may be listed more than once; handles of several Apps and eager results mix.
    Raises :class:`taskq.ResultUnavailable` at once for a task sent with ``ignore_result``.
    """
    handles = list(results)
    deadline = _deadline(timeout)
    values: list[Any] = [None] * len(handles)
    with _Watch(handles, "gather") as watch, _Progress(len(handles), progress) as bar:
        # A shown bar is redrawn now and then while nothing arrives (its rate falls).
        while (arrived := watch.wait(_soon(deadline) if bar.shown else deadline)) != []:
            if arrived is None:
                if deadline is not None and time.monotonic() >= deadline:
                    raise watch.timed_out(timeout)
                bar.refresh()
                continue
            first_failure: int | None = None
            failed = 0
            for positions in arrived:
                for position in positions:
                    values[position] = handles[position].get(propagate=False)
                if handles[positions[0]].failed():
                    failed += len(positions)
                    if first_failure is None or positions[0] < first_failure:
                        first_failure = positions[0]
            bar.count(sum(len(positions) for positions in arrived), failed)
            if propagate and first_failure is not None:
                raise values[first_failure]
    return values


def _soon(deadline: float | None) -> float:
    """When a shown progress bar is redrawn if nothing arrives before."""
    soon = time.monotonic() + REFRESH_IDLE
    return soon if deadline is None else min(soon, deadline)


def as_completed(results: Iterable[AsyncResult[R]], *, timeout: float | None = None
                 ) -> Iterator[AsyncResult[R]]:
    """Yield each handle of ``results`` once its task has finished (succeeded or failed),
    those finished already first; a handle listed twice is yielded twice.

    ``timeout`` bounds the whole iteration (counted from this call, including the time spent
    between items): :class:`taskq.TimeoutError` says how many are still pending. Raises
    :class:`taskq.ResultUnavailable` at once for a task sent with ``ignore_result``.
    """
    handles = list(results)
    watch = _Watch(handles, "as_completed")  # checked now, not at the first next()
    return _completing(watch, handles, _deadline(timeout), timeout)


def _completing(watch: _Watch, handles: list[AsyncResult[R]], deadline: float | None,
                timeout: float | None) -> Iterator[AsyncResult[R]]:
    with watch:
        while (arrived := watch.wait(deadline)) != []:
            if arrived is None:
                raise watch.timed_out(timeout)
            for positions in arrived:
                for position in positions:
                    yield handles[position]
