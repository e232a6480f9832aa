"""Workflows: signatures, chain, group and chord, with Celery's names and semantics.

* ``add.s(2, 2)`` is a :class:`Signature`: a task call to make later. It is partial: when a
  chain or a chord calls it, the previous result is prepended to its arguments; ``add.si(2,
  2)`` is immutable and takes none. It is a dict in Celery's form (``task``, ``args``,
  ``kwargs``, ``options``, ``subtask_type``, ``immutable``, ``chord_size``), so it can be a
  task's argument and be sent from there: ``signature(d).delay()``.
* ``chain(a.s(1), b.s(), c.s())`` or ``a.s(1) | b.s() | c.s()``: one step after another. The
  rest of the chain travels in each step's message (protocol v2's ``chain`` field, last step
  first); the worker that finishes a step sends the next. The caller's one AsyncResult is the
  last step's; a failure reaches it at once, saying which step failed.
* ``group(add.s(i, i) for i in range(100))``: sent together (pipelined confirms); a
  :class:`GroupResult` waits for all.
* ``chord(group, callback.s())``: the callback runs once, after every header task succeeded,
  with their results in order. The join lives in the broker (no result backend; the caller
  may exit after sending). A header that fails gives the caller a :class:`taskq.ChordError`
  naming it; the callback does not run.

Nothing here touches a broker: the worker's side (what a finished step sends, how a chord
part is joined) is in :mod:`taskq.worker.flow`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from .errors import ConfigurationError, TimeoutError
from .result import AsyncResult
from .routing import TOPIC_EXCHANGE
from .task import new_task_id

if TYPE_CHECKING:
    from .app import App

__all__ = [
    "Chain",
    "Chord",
    "Group",
    "GroupResult",
    "Signature",
    "chain",
    "chord",
    "group",
    "signature",
]

#: Options a signature may carry (``.set(...)``, ``apply_async(...)``), as in Celery.
OPTIONS = frozenset({
    "queue", "countdown", "eta", "expires", "priority", "time_limit", "soft_time_limit",
    "ignore_result", "routing_key", "exchange", "task_id", "link", "link_error",
})
#: Header keys of a group's (and a chord header's) members, as Celery's.
GROUP_HEADER, GROUP_INDEX_HEADER = "group", "group_index"


def _check_options(options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise ConfigurationError(
            f"unknown signature option(s) {', '.join(unknown)} (known: "
            f"{', '.join(sorted(OPTIONS))})"
        )
    checked = dict(options)
    if checked.get("routing_key") and "exchange" not in checked:
        checked["exchange"] = TOPIC_EXCHANGE  # a topic send, also when a Celery worker sends it
    for key in ("link", "link_error"):  # Celery's: a list of signatures
        if isinstance(checked.get(key), Mapping):
            checked[key] = [checked[key]]
    return checked


class Signature(dict[str, Any]):
    """A task call to make later (Celery's ``signature``); a dict in Celery's form."""

    def __init__(
        self,
        task: str | Mapping[str, Any] | Any,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        immutable: bool = False,
        subtask_type: str | None = None,
        app: App | None = None,
    ) -> None:
        if isinstance(task, Mapping):  # the dict form (from a message, or a copy)
            super().__init__(task)
            self.setdefault("args", [])
            self.setdefault("kwargs", {})
            self.setdefault("options", {})
            self.setdefault("subtask_type", None)
            self.setdefault("immutable", False)
            self.setdefault("chord_size", None)
            if not isinstance(self.get("task"), str) or not self["task"]:
                raise ConfigurationError(f"not a signature (it names no task): {dict(task)!r}")
            self._app = app
            return
        name = task if isinstance(task, str) else getattr(task, "name", None)
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"a signature needs a task or a task name, not {task!r}")
        super().__init__(
            task=name,
            args=list(args),
            kwargs=dict(kwargs or {}),
            options=dict(options or {}),
            subtask_type=subtask_type,
            immutable=immutable,
            chord_size=None,
        )
        self._app = app if app is not None else getattr(task, "app", None)

    # -- what it says ------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return str(self["task"])

    @property
    def args(self) -> tuple[Any, ...]:
        return tuple(self["args"] or ())

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self["kwargs"] or {})

    @property
    def options(self) -> dict[str, Any]:
        return cast(dict[str, Any], self["options"])

    @property
    def immutable(self) -> bool:
        return bool(self.get("immutable"))

    @property
    def id(self) -> str | None:
        """The task id it is sent with, once :meth:`freeze` gave it one."""
        return self.options.get("task_id")

    @property
    def app(self) -> App:
        if self._app is None:
            from .app import default_app

            self._app = default_app()
        return self._app

    def __repr__(self) -> str:
        args = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.name}{'!' if self.immutable else ''}({', '.join(args)})"

    # -- making variants ---------------------------------------------------------------------

    def set(self, **options: Any) -> Signature:
        """Set options (``queue=``, ``countdown=``, ``priority=``...); returns the signature."""
        self.options.update(_check_options(options))
        return self

    def clone(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Signature:
        """A copy with ``args`` prepended (unless immutable), ``kwargs`` and options merged."""
        copy = type(self)(dict(self), app=self._app)
        copy["options"] = {**self.options, **_check_options(options)}
        copy["kwargs"] = dict(self.kwargs)
        copy["args"] = list(self.args)
        if not self.immutable:
            copy["args"] = [*args, *self.args]
            copy["kwargs"].update(kwargs or {})
        return copy

    def link(self, callback: Signature) -> Signature:
        """Send ``callback`` with this task's result (prepended) when it succeeds
        (Celery's ``link``); returns ``callback``."""
        self.options.setdefault("link", []).append(callback)
        return callback

    def on_error(self, errback: Signature) -> Signature:
        """Send ``errback`` with this task's id (prepended) if it fails (Celery's
        ``link_error``, called as a task); returns this signature."""
        self.options.setdefault("link_error", []).append(errback)
        return self

    def freeze(self) -> str:
        """Give it its task id now (if it has none); returns the id."""
        task_id = self.options.get("task_id")
        if not task_id:
            task_id = self.options["task_id"] = new_task_id()
        return str(task_id)

    # -- sending -----------------------------------------------------------------------------

    def delay(self, *args: Any, **kwargs: Any) -> Any:
        """Send it, with ``args`` prepended to its own (unless immutable)."""
        return self.apply_async(args, kwargs)

    def apply_async(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        """Send it (with ``args`` prepended, ``kwargs`` and ``options`` merged); its result."""
        sig = self.clone(args, kwargs, **options)
        app = sig.app
        own = app.tasks.get(sig.name)
        if own is not None:
            own.check_arguments(sig.args, sig.kwargs)
        ignore = sig.options.get("ignore_result")
        if ignore is None:
            ignore = own.options.ignore_result if own is not None else False
        if app.config.eager:
            return app.send_task(sig.name, sig.args, sig.kwargs, ignore_result=bool(ignore),
                                 queue=sig.options.get("queue"))
        task_id = sig.freeze()
        for key in ("link", "link_error"):
            if isinstance(sig.options.get(key), list):
                sig.options[key] = [_routed(app, s) for s in sig.options[key]]
        pending, reply_to, replies = None, None, None
        if not ignore:
            replies = app.replies
            pending, reply_to = replies.expect(task_id), replies.queue
        try:
            envelope = app.envelope_for(sig, reply_to=reply_to)
        except BaseException:
            if replies is not None:
                replies.forget(task_id)
            raise
        app.dispatch(envelope, [task_id] if pending is not None else [])
        return AsyncResult(task_id, sig.name, pending, replies, app.exceptions)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run it here, now (no broker), like calling the task function."""
        sig = self.clone(args, kwargs)
        task = sig.app.tasks.get(sig.name)
        if task is None:
            raise ConfigurationError(f"no task named {sig.name!r} is registered in this app")
        return task.run(sig.args, sig.kwargs)

    def __or__(self, other: Signature) -> Chain:  # type: ignore[override]
        if not isinstance(other, Signature):
            return NotImplemented
        return Chain(self, other)


def signature(
    task: str | Mapping[str, Any] | Any,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    app: App | None = None,
    immutable: bool = False,
    **options: Any,
) -> Signature:
    """A signature from a task, a task name, or a signature's dict form (e.g. one a task got
    as an argument); a chain's, group's or chord's dict form gives that kind back."""
    if isinstance(task, Signature) and app is None:
        return task
    if isinstance(task, Mapping):
        kind = {"chain": Chain, "group": Group, "chord": Chord}.get(
            str(task.get("subtask_type") or ""), Signature)
        return cast(Signature, kind(task, app=app))
    return Signature(task, args, kwargs, _check_options(options), immutable=immutable, app=app)


def _member(value: Any, app: App | None) -> Signature:
    if isinstance(value, Signature):
        return value
    if isinstance(value, Mapping):
        return signature(value, app=app)
    raise ConfigurationError(f"a workflow's members are signatures (task.s(...)), not {value!r}")


class _Composite(Signature):
    """A chain or a group: a signature whose ``kwargs["tasks"]`` are signatures."""

    kind = ""

    def __init__(self, *tasks: Any, app: App | None = None, **options: Any) -> None:
        if len(tasks) == 1 and _is_form_of(tasks[0], self.kind):  # the dict form
            super().__init__(tasks[0], app=app)
            members = [_member(t, app) for t in self["kwargs"].get("tasks") or ()]
        else:
            if len(tasks) == 1 and not isinstance(tasks[0], Signature):
                tasks = tuple(cast(Iterable[Any], tasks[0]))  # group(generator), chain([...])
            members = [_member(t, app) for t in tasks]
            super().__init__(f"celery.{self.kind}", (), {}, _check_options(options),
                             subtask_type=self.kind, app=app)
        self["kwargs"] = {"tasks": members}
        if self._app is None and members:
            self._app = members[0]._app

    @property
    def tasks(self) -> list[Signature]:
        return cast(list[Signature], self["kwargs"]["tasks"])

    def __repr__(self) -> str:
        return f"{self.kind}({', '.join(repr(t) for t in self.tasks)})"

    def clone(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Signature:
        copy = type(self)(*[t.clone() for t in self.tasks], app=self._app,
                          **{**self.options, **options})
        return copy


def _is_form_of(value: Any, kind: str) -> bool:
    """Whether ``value`` is the dict form of a ``kind`` (a chain, a group), not one member."""
    return isinstance(value, Mapping) and value.get("subtask_type") == kind and (
        not isinstance(value, Signature) or isinstance(value, _Composite))


class Chain(_Composite):
    """Steps run one after another, each result passed to the next (Celery's ``chain``)."""

    kind = "chain"

    def __or__(self, other: Signature) -> Chain:  # type: ignore[override]
        if not isinstance(other, Signature):
            return NotImplemented
        return Chain(*self.tasks, other, app=self._app)

    def steps(self) -> list[Signature]:
        """The task signatures in order (inner chains flattened)."""
        flat: list[Signature] = []
        for step in self.tasks:
            if isinstance(step, Chain):
                flat.extend(step.steps())
            elif isinstance(step, _Composite | Chord) or step.get("subtask_type"):
                raise ConfigurationError(
                    f"a chain's steps are task signatures here; {step!r} is a "
                    f"{step.get('subtask_type')} (send it from a task instead)"
                )
            else:
                flat.append(step)
        return flat

    def apply_async(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        """Send the first step (``args`` prepended to its own) with the rest of the chain in
        its message; returns the last step's AsyncResult."""
        steps = [s.clone() for s in self.steps()]
        if not steps:
            raise ConfigurationError("an empty chain has nothing to run")
        steps[0] = steps[0].clone(args, kwargs, **{**self.options, **options})
        app = steps[0].app
        if app.config.eager:
            return _eager_chain(steps)
        ids = [s.freeze() for s in steps]
        last = steps[-1]
        replies = app.replies
        reply_to = replies.queue
        pending = replies.expect(ids[-1])
        try:
            for step in steps:
                step.options["reply_to"] = reply_to
                _route(app, step)
            rest = [dict(s) for s in reversed(steps[1:])]
            envelope = app.envelope_for(steps[0], reply_to=reply_to,
                                        embed={"chain": rest} if rest else None)
        except BaseException:
            replies.forget(ids[-1])
            raise
        app.dispatch(envelope, [ids[-1]])
        return AsyncResult(ids[-1], last.name, pending, replies, app.exceptions)


class Group(_Composite):
    """Tasks sent together, each running on its own (Celery's ``group``)."""

    kind = "group"

    def __or__(self, other: Signature) -> Chord:  # type: ignore[override]
        """``group(...) | callback.s()``: Celery makes that a chord; so does taskq."""
        if not isinstance(other, Signature):
            return NotImplemented
        return Chord(self, other, app=self._app)

    def apply_async(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> GroupResult:
        """Send every member in one batch (pipelined confirms); returns their GroupResult."""
        members = [t.clone(args, kwargs, **{**self.options, **options}) for t in self.tasks]
        for member in members:
            if member.get("subtask_type"):
                raise ConfigurationError(
                    f"a group's members are task signatures here, not {member!r}")
        group_id = self.options.get("task_id") or new_task_id()
        if not members:
            return GroupResult(group_id, [])
        app = members[0].app
        if app.config.eager:
            return GroupResult(group_id, [m.apply_async() for m in members])
        results: list[AsyncResult[Any]] = []
        with app.batch():
            replies = app.replies
            for index, member in enumerate(members):
                task_id = member.freeze()
                pending = replies.expect(task_id)
                try:
                    envelope = app.envelope_for(
                        member, reply_to=replies.queue,
                        headers={GROUP_HEADER: group_id, GROUP_INDEX_HEADER: index})
                except BaseException:
                    replies.forget(task_id)
                    raise
                app.dispatch(envelope, [task_id])
                results.append(AsyncResult(task_id, member.name, pending, replies,
                                           app.exceptions))
        return GroupResult(group_id, results)


class Chord(Signature):
    """A group whose results, once all are in, go to a callback (Celery's ``chord``).

    ``chord(header, callback)`` or ``chord(header)(callback)``.
    """

    def __init__(
        self,
        header: Any,
        body: Signature | None = None,
        *,
        app: App | None = None,
        **options: Any,
    ) -> None:
        if _is_form_of(header, "chord") and not isinstance(header, Group):
            super().__init__(header, app=app)
            kwargs = self["kwargs"]
            self["kwargs"] = {"header": Group(kwargs["header"], app=app),
                              "body": _member(kwargs["body"], app) if kwargs.get("body")
                              else None}
            return
        group_ = header if isinstance(header, Group) else Group(header, app=app)
        super().__init__("celery.chord", (), {}, _check_options(options),
                         subtask_type="chord", app=app or group_._app)
        self["kwargs"] = {"header": group_, "body": body}

    @property
    def header(self) -> Group:
        return cast(Group, self["kwargs"]["header"])

    @property
    def body(self) -> Signature | None:
        return cast("Signature | None", self["kwargs"]["body"])

    def __repr__(self) -> str:
        return f"chord({self.header!r}, {self.body!r})"

    def __call__(self, body: Signature | None = None, **options: Any) -> Any:
        """``chord(header)(callback)``: send it with that callback."""
        return Chord(self.header, body if body is not None else self.body, app=self._app,
                     **{**self.options, **options}).apply_async()

    def apply_async(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        """Send the header tasks in one batch, each carrying the callback; returns the
        callback's AsyncResult."""
        if self.body is None:
            raise ConfigurationError("a chord needs a callback: chord(header, callback.s())")
        if self.body.get("subtask_type"):
            raise ConfigurationError(
                f"a chord's callback is a task signature here, not {self.body!r}")
        callback = self.body.clone(args, kwargs, **options)
        members = [t.clone() for t in self.header.tasks]
        for member in members:
            if member.get("subtask_type"):
                raise ConfigurationError(
                    f"a chord's header tasks are task signatures here, not {member!r}")
        app = callback.app
        if app.config.eager:
            values = [m.apply_async().get() for m in members]
            return callback.clone([values]).apply_async()
        chord_id = callback.freeze()
        group_id = self.header.options.get("task_id") or new_task_id()
        replies = app.replies
        pending = replies.expect(chord_id)
        callback.options["reply_to"] = replies.queue
        callback["chord_size"] = len(members)
        _route(app, callback)
        if not members:  # nothing to wait for: the callback runs at once, with []
            replies.forget(chord_id)
            return callback.clone([[]]).apply_async()
        try:
            with app.batch():
                for index, member in enumerate(members):
                    envelope = app.envelope_for(
                        member, task_id=member.freeze(), embed={"chord": dict(callback)},
                        headers={GROUP_HEADER: group_id, GROUP_INDEX_HEADER: index})
                    app.dispatch(envelope)
        except BaseException:
            replies.forget(chord_id)
            raise
        return AsyncResult(chord_id, callback.name, pending, replies, app.exceptions)


class GroupResult:
    """The results of a group's tasks, in the group's order."""

    def __init__(self, group_id: str, results: Sequence[AsyncResult[Any]]) -> None:
        self.id = group_id
        self.results = list(results)

    def __repr__(self) -> str:
        return f"<GroupResult {self.id} {self.completed_count()}/{len(self.results)} done>"

    def __iter__(self) -> Iterator[AsyncResult[Any]]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, index: int) -> AsyncResult[Any]:
        return self.results[index]

    def ready(self) -> bool:
        """Whether every task has finished (succeeded or failed)."""
        return all(r.ready() for r in self.results)

    def successful(self) -> bool:
        return all(r.successful() for r in self.results)

    def failed(self) -> bool:
        return any(r.failed() for r in self.results)

    def completed_count(self) -> int:
        """How many succeeded so far."""
        return sum(1 for r in self.results if r.successful())

    def get(self, timeout: float | None = None, propagate: bool = True) -> list[Any]:
        """Wait for all; their values in order. Raises the first failure in order (unless
        ``propagate=False``: the exceptions are then in the list) and
        :class:`taskq.TimeoutError` if ``timeout`` seconds pass first (for all together)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        values = []
        for result in self.results:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                values.append(result.get(timeout=left, propagate=propagate))
            except TimeoutError:
                raise TimeoutError(
                    f"group {self.id}: {self.completed_count()} of {len(self.results)} tasks "
                    f"done within {timeout:g}s; get() can be called again"
                ) from None
        return values


def _route(app: App, sig: Signature) -> None:
    """Settle where a workflow's later message goes, by the sender's routes (the worker that
    sends it may have other defaults); the same for its ``link``/``link_error`` signatures."""
    options = sig.options
    for key in ("link", "link_error"):
        linked = options.get(key)
        if isinstance(linked, list):
            options[key] = [_routed(app, s) for s in linked]
    if options.get("queue") or options.get("routing_key"):
        return
    own = app.tasks.get(sig.name)
    if own is not None and own.options.queue:
        options["queue"] = own.options.queue
        return
    route = app.router.route_for(sig.name)
    if route is not None and route.routing_key is not None:
        options["routing_key"], options["exchange"] = route.routing_key, TOPIC_EXCHANGE
    else:
        options["queue"] = (route.queue if route is not None else None) \
            or app.config.default_queue


def _routed(app: App, raw: Any) -> Any:
    if not isinstance(raw, Mapping):
        return raw
    sig = raw if isinstance(raw, Signature) else Signature(raw, app=app)
    _route(app, sig)
    return sig


def _eager_chain(steps: list[Signature]) -> Any:
    """``App(eager=True)``: run the steps here, one after another, as a worker would."""
    result = steps[0].apply_async()
    for step in steps[1:]:
        if result.failed():
            break
        result = step.clone([result.get()]).apply_async()
    return result


#: Celery's lowercase names.
chain = Chain
group = Group
chord = Chord
