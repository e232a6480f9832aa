"""The wire format: Celery's task message protocol v2 and its ``rpc://`` result messages.

A task message carries its routing facts in AMQP properties (``correlation_id`` = task id,
``reply_to``), its metadata in headers (``task``, ``id``, ``retries``, ``eta``, ``expires``,
``timelimit``, ...) and ``[args, kwargs, embed]`` as its body.  A result message is
``{"task_id", "status", "result", "traceback", "children", "date_done"}``; a failure's
``result`` is ``{"exc_type", "exc_message", "exc_module"}``.  docs/protocol.md has the detail.

Nothing here touches a broker: :class:`Envelope` is what goes out, :class:`Delivery` what
comes in, and the broker layer maps them onto AMQP.
"""

from __future__ import annotations

import builtins
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from . import serialization
from .errors import KNOWN_FAILURE_MODULES, KNOWN_FAILURES, DecodeError, RemoteError
from .serialization import CONTENT_TYPES

#: Header keys taskq itself adds (never part of Celery's protocol, ignored by Celery).
DELIVERY_COUNT_HEADER = "x-taskq-delivery-count"
#: On a broadcast: the queue whose workers it was sent to (Celery ignores it).
BROADCAST_HEADER = "broadcast"

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 200
_repr.maxlist = _repr.maxtuple = _repr.maxdict = 20


@dataclass(slots=True)
class Envelope:
    """A message ready for the broker: where it goes and what it carries."""

    queue: str
    body: bytes
    content_type: str | None
    headers: dict[str, Any]
    correlation_id: str | None = None
    reply_to: str | None = None
    #: Seconds from now before the message may be delivered (0: at once).
    delay: float = 0.0
    #: Kept from the original when a message is copied (dead letters, retries).
    content_encoding: str | None = None
    #: Higher runs first on a priority queue (None: the lowest; see Config.max_priority).
    priority: int | None = None
    #: Sent by topic: to every queue bound to a pattern this key matches (``queue`` unused).
    routing_key: str | None = None
    #: Sent to every worker of ``queue`` that is up (each has a queue of its own for these).
    broadcast: bool = False
    #: A workflow's message that a process killed at the wrong moment may store twice (a
    #: chain's next step, a chord's callback, a schedule's fire), always under the same task
    #: id: the broker sees that only one copy runs (see ``SlotLink.is_copy``).
    once: bool = False
    #: What a ``once`` message's run is claimed under, and its place there: a chain's steps
    #: share the chain's key, each later step with a higher place (None: its own task id).
    once_scope: tuple[str, int] | None = None

    @property
    def task_id(self) -> str:
        return str(self.headers.get("id") or self.correlation_id or "?")




@dataclass(slots=True)
class Delivery:
    """A message as a consumer received it."""

    body: bytes
    content_type: str | None
    headers: dict[str, Any]
    correlation_id: str | None
    reply_to: str | None
    redelivered: bool
    queue: str
    exchange: str = ""
    routing_key: str = ""
    tag: Any = None
    properties: dict[str, Any] = field(default_factory=dict)

    @property
    def task_id(self) -> str | None:
        value = self.headers.get("id") or self.correlation_id
        return str(value) if value else None

    @property
    def task_name(self) -> str | None:
        value = self.headers.get("task")
        return str(value) if value else None


def bounded_repr(value: Any) -> str:
    """A repr that stays short however big the value (for logs and ``taskq dlq show``)."""
    return _repr.repr(value)


def task_envelope(
    *,
    task_id: str,
    name: str,
    args: tuple[Any, ...] | list[Any],
    kwargs: Mapping[str, Any],
    queue: str,
    serializer: str,
    reply_to: str | None,
    eta: datetime | None = None,
    expires: datetime | None = None,
    delay: float = 0.0,
    retries: int = 0,
    time_limit: float | None = None,
    soft_time_limit: float | None = None,
    root_id: str | None = None,
    parent_id: str | None = None,
    ignore_result: bool = False,
    extra_headers: Mapping[str, Any] | None = None,
    priority: int | None = None,
    routing_key: str | None = None,
    broadcast: bool = False,
    embed: Mapping[str, Any] | None = None,
    once: bool = False,
) -> Envelope:
    """Build a protocol-v2 task message (raises EncodeError naming the task if args won't go).

    ``embed``: the body's workflow part (a chain's later steps, a chord's callback)."""
    body = serialization.task_body(serializer, args, kwargs, f"arguments of task {name}", embed)
    # Only headers that say something: one left out means its default (root_id: the task's
    # own id; parent_id, group: none), and Celery's worker reads all but task and id with
    # .get() and that default. Every header costs encoding here, parsing in the broker (it
    # scans for CC/BCC routing headers: measured, 6 headers instead of 3 cost a confirmed
    # publish ~15%) and decoding in the worker. `taskq dlq show` decodes the body to show
    # arguments, so argsrepr/kwargsrepr are not sent either.
    headers: dict[str, Any] = {"lang": "py", "task": name, "id": task_id}
    if root_id and root_id != task_id:
        headers["root_id"] = root_id
    if parent_id:
        headers["parent_id"] = parent_id
    if eta is not None:
        headers["eta"] = eta.isoformat()
    if expires is not None:
        headers["expires"] = expires.isoformat()
    if retries:
        headers["retries"] = retries
    if time_limit is not None or soft_time_limit is not None:
        headers["timelimit"] = [time_limit, soft_time_limit]
    if ignore_result:
        headers["ignore_result"] = True
    if extra_headers:
        headers.update(extra_headers)
    if broadcast:  # the workers' result says who answered; a dead letter goes to this queue's
        headers[BROADCAST_HEADER] = queue
    return Envelope(
        queue=queue,
        body=body,
        content_type=CONTENT_TYPES[serializer],
        headers=headers,
        correlation_id=task_id,
        reply_to=reply_to,
        delay=delay,
        priority=priority,
        routing_key=routing_key,
        broadcast=broadcast,
        once=once,
    )


def parse_body(delivery: Delivery, accept: tuple[str, ...]) -> tuple[list[Any], dict[str, Any]]:
    """Decode ``[args, kwargs, embed]``; raise ContentDisallowed or DecodeError."""
    args, kwargs, _ = parse_full_body(delivery, accept)
    return args, kwargs


def parse_full_body(
    delivery: Delivery, accept: tuple[str, ...]
) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
    """``(args, kwargs, embed)``; an embed that is missing or not a mapping reads as {}."""
    value = serialization.decode(delivery.content_type, delivery.body, accept)
    if (
        not isinstance(value, (list, tuple))
        or len(value) < 2
        or not isinstance(value[0], (list, tuple))
        or not isinstance(value[1], dict)
    ):
        raise DecodeError("body is not a protocol v2 task body [args, kwargs, embed]")
    embed = value[2] if len(value) > 2 and isinstance(value[2], dict) else {}
    return list(value[0]), value[1], embed


def with_parts(template: Envelope, parts: list[bytes], prepend: bool) -> Envelope:
    """A chord callback's message: ``template``'s, with the list of the parts' values (in
    order) prepended to its arguments, unless the callback is immutable (``prepend``)."""
    if not prepend:
        return template
    serializer = serialization.SERIALIZER_FOR.get(template.content_type or "", "json")
    accept = (serializer,)
    value = serialization.decode(template.content_type, template.body, accept)
    values = [serialization.decode(template.content_type, part, accept) for part in parts]
    body = serialization.check_encodable(
        serializer, [[values, *value[0]], value[1], *value[2:]], "a chord callback's arguments")
    return replace(template, body=body)


def parse_time(value: Any) -> datetime | None:
    """Read an ``eta``/``expires`` header: ISO 8601; a naive one is taken as UTC."""
    if not value:
        return None
    moment = datetime.fromisoformat(str(value))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment


# -- results -------------------------------------------------------------------------------------


def result_body(
    serializer: str,
    task_id: str,
    status: str,
    result: Any,
    traceback: str | None = None,
    worker: str | None = None,
) -> bytes:
    """Encode a result message as Celery's rpc backend writes it (plus, for a broadcast,
    the ``worker`` that answered: Celery ignores it)."""
    meta = {
        "task_id": task_id,
        "status": status,
        "result": result,
        "traceback": traceback,
        "children": [],
        "date_done": datetime.now(timezone.utc).isoformat(),
    }
    if worker is not None:
        meta["worker"] = worker
    return serialization.encode(serializer, meta)


def exception_to_wire(exc: BaseException) -> dict[str, Any]:
    """Describe an exception the way Celery's JSON result backend does."""
    cls = type(exc)
    args: list[Any] = []
    for arg in exc.args:
        try:
            serialization.encode("json", arg)
        except Exception:
            arg = repr(arg)
        args.append(arg)
    return {"exc_type": cls.__qualname__, "exc_message": args, "exc_module": cls.__module__}


#: Builtin exception types that are never rebuilt in a caller: raising them there would
#: stop the caller's program or break generator protocols.
_UNSAFE_BUILTINS = frozenset(
    {
        "SystemExit",
        "KeyboardInterrupt",
        "GeneratorExit",
        "StopIteration",
        "StopAsyncIteration",
        "BaseExceptionGroup",
        "ExceptionGroup",
    }
)


#: Exception types an app registered to be rebuilt as themselves: ``(module, qualname)`` →
#: the class (see :meth:`taskq.App.exception`).
Registered = Mapping[tuple[str, str], type[BaseException]]


def exception_from_wire(
    meta: Any, traceback: str | None, registered: Registered | None = None
) -> BaseException:
    """Rebuild a failure: builtins, taskq's own errors and the types in ``registered`` as
    themselves, the rest as RemoteError.

    Looks classes up by name in fixed tables; never imports anything a message names.
    """
    if not isinstance(meta, Mapping):
        return RemoteError("UnknownError", repr(meta), traceback)
    exc_type = str(meta.get("exc_type") or "UnknownError")
    exc_module = str(meta.get("exc_module") or "")
    raw = meta.get("exc_message")
    args = list(raw) if isinstance(raw, (list, tuple)) else ([] if raw is None else [raw])
    message = ", ".join(str(a) for a in args)

    cls: type[BaseException] | None = None
    taskq_own = False  # taskq's errors take one message; other types their original args
    if exc_module == "builtins" and exc_type not in _UNSAFE_BUILTINS:
        candidate = getattr(builtins, exc_type, None)
        if isinstance(candidate, type) and issubclass(candidate, Exception):
            cls = candidate
    elif exc_module in KNOWN_FAILURE_MODULES:
        cls = KNOWN_FAILURES.get(exc_type)
        taskq_own = True
    elif registered:
        cls = registered.get((exc_module, exc_type))

    if cls is not None:
        try:
            exc = cls(message) if taskq_own else cls(*args)
        except Exception:  # a constructor that wants other arguments: RemoteError below
            exc = None
        if exc is not None:
            if traceback and hasattr(exc, "add_note"):
                exc.add_note(f"Remote traceback (from the worker):\n{traceback.rstrip()}")
            return exc
    error = RemoteError(exc_type, message, traceback, exc_module)
    if traceback and hasattr(error, "add_note"):
        error.add_note(f"Remote traceback (from the worker):\n{traceback.rstrip()}")
    return error
