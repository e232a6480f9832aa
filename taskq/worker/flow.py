"""A workflow's next move, decided where a task finished (see :mod:`taskq.canvas`).

A chain step's message carries the rest of its chain (protocol v2's ``chain`` field: the
later steps' signatures, last step first); a chord header task's carries the chord's
callback (the ``chord`` field, with ``chord_size``) and its place (the ``group_index``
header). When such a task has run, this says what the slot's settle must store with it
(:class:`~taskq.broker.base.After`):

* a chain step that succeeded: the next step, its arguments prepended with this result;
* a chord header that succeeded: its part of the chord, for the broker's join, which stores
  the callback with every part's value once the last part is in;
* one that failed: the failure, for the callers waiting on the rest (a chain's last step, a
  chord's callback), which will not run.

Pure: builds messages, never touches the broker.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from .. import serialization, states
from ..app import App
from ..broker.base import After, Join, Reply
from ..canvas import GROUP_INDEX_HEADER, Signature
from ..errors import ChordError
from ..message import Delivery, Envelope, exception_to_wire, parse_full_body, result_body

log = logging.getLogger("taskq.worker")

def embed_of(delivery: Delivery, accept: tuple[str, ...]) -> dict[str, Any]:
    """The body's workflow part ({} if none, or if the body can't be read)."""
    try:
        return parse_full_body(delivery, accept)[2]
    except Exception:  # not content it may read, not a task body: no workflow to tell
        return {}


def is_flow(embed: Mapping[str, Any]) -> bool:
    return bool(embed.get("chain") or embed.get("chord") or embed.get("callbacks")
                or embed.get("errbacks"))


def after_success(
    app: App, embed: Mapping[str, Any], headers: Mapping[str, Any], task_id: str, value: Any
) -> After | None:
    """What to store when a task of a workflow succeeded with ``value``: the chain's next
    step, or the chord part; and the ``link`` callbacks, with ``value`` prepended."""
    messages = _linked(app, embed.get("callbacks"), value, headers, task_id)
    join = None
    chain = embed.get("chain")
    callback = embed.get("chord")
    if isinstance(chain, list) and chain:
        messages.append(_next_step(app, chain, headers, task_id, value))
    elif isinstance(callback, Mapping):
        join = _part(app, callback, headers, task_id, value)
    return After(messages=tuple(messages), join=join) if messages or join else None


def _linked(app: App, sigs: Any, first: Any, headers: Mapping[str, Any],
            task_id: str) -> list[Envelope]:
    """Messages for Celery's ``link``/``link_error`` signatures, ``first`` prepended to
    each (unless immutable); run once if frozen (a task id of their own), else at least once."""
    if not isinstance(sigs, list):
        return []
    messages = []
    for raw in sigs:
        if not isinstance(raw, Mapping):
            continue
        sig = Signature(raw, app=app)
        args = list(sig.args) if sig.immutable else [first, *sig.args]
        messages.append(app.envelope_for(sig, args=args, reply_to=sig.options.get("reply_to"),
                                         headers=_lineage(headers, task_id),
                                         once=bool(sig.options.get("task_id"))))
    return messages


def after_failure(
    app: App, embed: Mapping[str, Any], headers: Mapping[str, Any], task: str, task_id: str,
    exc: BaseException, traceback: str | None,
) -> After | None:
    """What to tell when a task of a workflow failed (the later steps won't run), and the
    ``link_error`` errbacks to send (each with the failed task's id prepended, as Celery
    sends an errback that takes one argument)."""
    replies: list[Reply] = []
    chain = embed.get("chain")
    if isinstance(chain, list):
        trace = f"chain step {task}[{task_id}] failed\n{traceback or ''}"
        wire = exception_to_wire(exc)
        for step in chain:
            options = step.get("options") if isinstance(step, Mapping) else None
            if isinstance(options, Mapping):
                replies.extend(_failure_reply(options, wire, trace))
    callback = embed.get("chord")
    if isinstance(callback, Mapping) and isinstance(callback.get("options"), Mapping):
        error = ChordError(
            f"chord header task {task}[{task_id}] failed: {type(exc).__name__}: {exc}; "
            f"the callback {callback.get('task')} does not run"
        )
        replies.extend(_failure_reply(callback["options"], exception_to_wire(error), traceback))
    try:
        messages = _linked(app, embed.get("errbacks"), task_id, headers, task_id)
    except Exception as problem:  # an errback that can't be sent must not hide the failure
        log.error("task %s[%s]: its errbacks can't be sent: %s", task, task_id, problem)
        messages = []
    if not (replies or messages):
        return None
    return After(messages=tuple(messages), replies=tuple(replies))


def _failure_reply(options: Mapping[str, Any], wire: Any, trace: str | None) -> list[Reply]:
    reply_to, task_id = options.get("reply_to"), options.get("task_id")
    if not (isinstance(reply_to, str) and reply_to and isinstance(task_id, str) and task_id):
        return []
    body = result_body("json", task_id, states.FAILURE, wire, trace)
    return [Reply(body, "application/json", to=reply_to, correlation_id=task_id)]


def _lineage(headers: Mapping[str, Any], task_id: str) -> dict[str, Any]:
    return {"root_id": headers.get("root_id") or task_id, "parent_id": task_id}


def _next_step(
    app: App, chain: list[Any], headers: Mapping[str, Any], task_id: str, value: Any
) -> Envelope:
    step = Signature(chain[-1], app=app)
    rest = chain[:-1]
    args = list(step.args) if step.immutable else [value, *step.args]
    envelope = app.envelope_for(
        step, args=args, reply_to=step.options.get("reply_to"),
        embed={"chain": rest} if rest else None, headers=_lineage(headers, task_id),
        once=True,
    )
    # The chain's steps are claimed under its last step's id (one key per chain), later
    # steps in higher places: a step's copy that comes after the next step ran is let go.
    last = rest[0] if rest else chain[-1]
    key = last.get("options", {}).get("task_id") if isinstance(last, Mapping) else None
    if isinstance(key, str) and key:
        envelope.once_scope = (key, -len(rest))
    return envelope


def _part(
    app: App, callback: Mapping[str, Any], headers: Mapping[str, Any], task_id: str, value: Any
) -> Join:
    sig = Signature(callback, app=app)
    template = app.envelope_for(sig, reply_to=sig.options.get("reply_to"),
                                headers=_lineage(headers, task_id), once=True)
    serializer = serialization.SERIALIZER_FOR.get(template.content_type or "", "json")
    part = serialization.check_encodable(serializer, value, f"the result of {task_id} (a chord "
                                         "header task)")
    return Join(
        chord=sig.freeze(),
        index=int(headers.get(GROUP_INDEX_HEADER) or 0),
        size=int(callback.get("chord_size") or 0),
        part=part,
        callback=template,
        prepend=not sig.immutable,
    )
