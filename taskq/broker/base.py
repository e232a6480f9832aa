"""The broker interface: the small surface the rest of taskq sees, whatever the broker.

Each broker lives in a package of its own (:mod:`taskq.broker.amqp` for RabbitMQ,
:mod:`taskq.broker.sqlite` for the embedded one) and implements these classes; the producer,
the result listener, the worker and the CLI use nothing else. No delivery tags, sockets,
heartbeats, channel errors or dead-letter naming rules outside a broker's package.

* :class:`Broker`: made from the URL (:func:`taskq.broker.broker_for`); opens the links below.
* :class:`ClientLink`: confirmed publishing, and on one link per process the reply queue.
  Used by one thread at a time.
* :class:`SlotLink`: a worker slot's link: one message at a time, settled by exactly one of
  :meth:`~SlotLink.settle`, :meth:`~SlotLink.dead_letter`, :meth:`~SlotLink.forward` or
  :meth:`~SlotLink.requeue_lost`.
* :class:`Admin`: dead letters, for ``taskq dlq``.
* :class:`BeatLink`: a scheduler's (``taskq beat``): who is active, what was fired.
* :class:`ControlLink`: Celery's monitoring protocols (events, remote control) and the
  revocations kept in the broker: for a worker's monitor and for ``taskq status``/
  ``inspect``/``events``/``revoke``.
* :class:`WorkerSupport`: what a worker's supervisor does for its slots (what a dead slot
  leaves behind).

Links tell a waiting thread when to look through :class:`Readiness`: a descriptor to
``poll()``, plus input already read that ``poll()`` cannot see.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import select
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from ..config import Config
from ..errors import BrokerError
from ..message import Delivery, Envelope, with_parts

DeliveryCallback = Callable[[Delivery], None]
L = TypeVar("L")


class Readiness(Protocol):
    """When a link has something to handle: for the one thread that waits on it."""

    def fileno(self) -> int:
        """A descriptor that polls readable when there may be input."""
        ...

    def buffered(self) -> bool:
        """Input already taken in, which ``poll()`` on :meth:`fileno` won't report."""
        ...

    def waiting(self) -> bool:
        """Anything to handle now (never blocks)."""
        ...


@dataclass(frozen=True)
class Reply:
    """A result for the caller of a task: the body of a result message and its type."""

    body: bytes
    content_type: str
    #: For a caller other than the message's own (its reply queue and the task id it waits
    #: on): e.g. a chain's caller, told of a failure in an earlier step. None: the message's.
    to: str | None = None
    correlation_id: str | None = None


@dataclass(frozen=True)
class Join:
    """One part of a chord: a header task's result, for the chord's join in the broker.

    When the broker holds all ``size`` parts of ``chord`` (whichever settle brings the last
    one), it stores the callback's message: :meth:`complete`, from the parts in order.
    """

    chord: str
    index: int
    size: int
    #: The header task's result, encoded as the callback's arguments are.
    part: bytes
    #: The callback's message, before the parts' values are prepended to its arguments.
    callback: Envelope
    prepend: bool = True

    def complete(self, parts: list[bytes]) -> Envelope:
        """The callback's message, given every part (in order of index)."""
        return with_parts(self.callback, parts, self.prepend)


@dataclass(frozen=True)
class After:
    """What a settle stores besides the result, before the message goes: the next messages
    of a workflow (marked ``once``), results for other callers, a chord part."""

    messages: tuple[Envelope, ...] = ()
    replies: tuple[Reply, ...] = ()
    join: Join | None = None


NOTHING_AFTER = After()


class ClientLink(abc.ABC):
    """A client's link to the broker. One thread at a time."""

    #: The process that opened it (a link is never used across ``fork()``).
    pid: int
    #: Why the broker refuses publishes right now (a resource alarm), or None.
    blocked: str | None
    #: Input to handle: results, confirms, the broker's notices.
    input: Readiness

    @abc.abstractmethod
    def publish(self, envelope: Envelope, deadline: float) -> None:
        """Store one message; return once the broker has it (raise otherwise)."""

    @abc.abstractmethod
    def publish_many(
        self, envelopes: Sequence[Envelope], deadline: float, confirmed: set[str]
    ) -> dict[str, str]:
        """Store all, pipelined; return ``{task_id: reason}`` for refused ones.

        Adds the task ids the broker stored to ``confirmed`` as it goes, so that after a
        connection error the caller sends only the rest again.
        """

    @abc.abstractmethod
    def consume_replies(
        self,
        queue: str,
        expires: float,
        on_reply: DeliveryCallback,
        *,
        must_exist: bool,
    ) -> bool:
        """Create (if needed) and read the reply queue ``queue``: results go to ``on_reply``.

        Returns False if the queue was gone although it should have existed (results sent to
        it meanwhile are lost).
        """

    @abc.abstractmethod
    def delete_replies(self, queue: str) -> None:
        """Delete the reply queue (this client is done with it)."""

    @abc.abstractmethod
    def drain(self) -> None:
        """Handle every input already received (results are filed); never blocks."""

    @abc.abstractmethod
    def tick(self) -> None:
        """Keep the link alive; call at least every :attr:`tick_interval` seconds."""

    tick_interval: float = 1.0

    @abc.abstractmethod
    def close(self) -> None:
        """Close politely (bounded)."""

    @abc.abstractmethod
    def drop(self) -> None:
        """Discard after an error, without a handshake with a broker that may be gone."""

    @abc.abstractmethod
    def abandon(self) -> None:
        """Forget a link inherited across ``fork()`` without disturbing the parent's."""


class SlotLink(abc.ABC):
    """A worker slot's link: it holds at most one message, the one the slot runs."""

    #: When it was opened (monotonic): tells a slot's late-noticed loss from a new outage.
    opened_at: float
    input: Readiness
    #: How often :meth:`tick` must run (seconds; the slot's loop calls it).
    tick_interval: float = 1.0

    @abc.abstractmethod
    def start(self) -> None:
        """Start (or resume) taking messages; they arrive through :meth:`drain`."""

    @abc.abstractmethod
    def pause(self) -> None:
        """Take no new message (warm shutdown). The one held may still be settled."""

    @abc.abstractmethod
    def drain(self) -> None:
        """Handle what arrived; deliveries go to the callback given when it was opened."""

    @abc.abstractmethod
    def admit(self, key: str, interval: float) -> bool:
        """Whether a run limited to one start per ``interval`` seconds under ``key`` may
        start now; if so, the start is recorded (atomically, for every process of the
        broker). False: not before the interval since the last start has passed."""

    @abc.abstractmethod
    def ready_now(self) -> bool:
        """Whether a message of the link's queues is ready to be taken now (not one held,
        nor one delayed to later). Asks the broker: for ``--burst``, not for every loop."""

    @abc.abstractmethod
    def next_wakeup(self) -> float | None:
        """Seconds until :meth:`drain` should run even if nothing polls readable (None: no
        need), e.g. when a delayed message falls due."""

    @abc.abstractmethod
    def tick(self) -> None:
        """Housekeeping (heartbeats, noticing dead peers); from the slot's own thread."""

    @abc.abstractmethod
    def keepalive(self) -> None:
        """Keep the link alive while a task runs in the slot's thread (from another thread)."""

    @abc.abstractmethod
    def settle(self, delivery: Delivery, reply: Reply | None, after: After = NOTHING_AFTER) -> None:
        """The task ran: send its result (if any) and store what ``after`` holds, then let
        the message go. If this process dies midway the message runs again and ``after`` is
        stored again: each of its messages, and a chord's callback, still runs once (see
        :meth:`is_copy`)."""

    def is_copy(self, delivery: Delivery) -> bool:
        """Whether ``delivery`` is a second copy of a ``once`` message (stored again by a
        rerun of what sent it) whose first copy ran or runs: let it go without running it.
        A broker that never stores a ``once`` message twice says False."""
        return False

    @abc.abstractmethod
    def reply(self, delivery: Delivery, reply: Reply) -> None:
        """Send a result without settling anything (e.g. one computed on a lost link)."""

    @abc.abstractmethod
    def dead_letter(
        self, delivery: Delivery, exc_type: str, reason: str, worker: str, reply: Reply | None
    ) -> str:
        """Keep the message with why it could not be processed; tell its caller (``reply``);
        let it go. Returns where it was kept, for the log."""

    @abc.abstractmethod
    def forward(self, delivery: Delivery, envelope: Envelope, reply: Reply | None) -> None:
        """Replace the message by ``envelope`` (a retry, a message not due yet): store that,
        tell the caller (``reply``), then let this one go."""

    @abc.abstractmethod
    def requeue_lost(self, delivery: Delivery) -> None:
        """The process running it died: count a lost run and put it back where it was."""

    @abc.abstractmethod
    def lost_runs(self, delivery: Delivery) -> int:
        """How many runs of this message were cut short by the death of their process."""

    def run_record(self, delivery: Delivery) -> bytes:
        """What the broker needs to count a lost run of ``delivery`` if this slot's process
        dies running it (kept in the slot's run record; see :class:`WorkerSupport`)."""
        return b""

    def hold_handle(self) -> int | None:
        """A descriptor whose duplicate, kept by the worker's supervisor, keeps the link's
        message held if the slot process dies, until the supervisor has settled its death
        (see :class:`WorkerSupport`). None: the broker needs none."""
        return None

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def drop(self) -> None: ...


@dataclass(frozen=True)
class DeadLetter:
    """A message a worker could not process, with why (``taskq dlq`` shows these)."""

    id: str
    task: str
    exception: str
    reason: str
    dead_at: str
    original_queue: str
    worker: str
    body: bytes
    content_type: str | None
    headers: dict[str, Any] = field(default_factory=dict)
    reply_to: str | None = None
    #: Broker-specific handle (where it is stored).
    ref: Any = None


_C = TypeVar("_C", bound="Closing")


class Closing(abc.ABC):
    """A broker link or tool used as a context manager: ``with ... as x:`` closes it."""

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abc.abstractmethod
    def close(self) -> None: ...


class Admin(Closing):
    """Looking into dead letters and moving them (``taskq dlq``). A context manager."""

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def dead_letter_count(self, queue: str) -> int:
        """How many dead letters ``queue`` has (raise BrokerError if there is no such queue)."""

    @abc.abstractmethod
    def dead_letters(self, queue: str) -> Iterator[DeadLetter]:
        """The dead letters of ``queue``, oldest first, one at a time (bounded memory)."""

    @abc.abstractmethod
    def replay(
        self,
        queue: str,
        wanted: Callable[[DeadLetter], bool],
        rebuild: Callable[[DeadLetter], tuple[Envelope, str]],
    ) -> Iterator[tuple[DeadLetter, str]]:
        """Send the wanted dead letters of ``queue`` back as ``rebuild`` makes them (with a
        note), each removed only once its copy is stored; yields each replayed, with the note.
        Only the letters there when it starts: one that fails again comes back behind."""

    @abc.abstractmethod
    def purge(self, queue: str) -> int:
        """Delete every dead letter of ``queue``; how many."""

    @abc.abstractmethod
    def queue_stats(self, queues: Iterable[str]) -> list[QueueStats]:
        """What the broker can tell of each of ``queues`` that exists (``taskq status``)."""

    def known_queues(self) -> list[str]:
        """The work queues the broker can list by itself ([] where it can't: AMQP)."""
        return []


@dataclass(frozen=True)
class QueueStats:
    """What the broker can tell of one queue now (None: it can't)."""

    name: str
    ready: int
    unacked: int | None = None
    consumers: int | None = None
    dead: int | None = None
    #: Seconds since the oldest ready message was sent.
    oldest: float | None = None


def decoded_body(body: Any) -> dict[str, Any]:
    """A monitoring message's JSON object, or {} for anything else (bytes that aren't UTF-8
    or JSON, JSON nested too deep to parse, a value that isn't an object)."""
    if isinstance(body, (bytes, bytearray, memoryview)):
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            return {}
    try:
        value = json.loads(body)
    except (TypeError, ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def command_body(method: str, arguments: dict[str, Any], destination: Sequence[str] | None,
                 ticket: str | None, reply_to: dict[str, str] | None) -> dict[str, Any]:
    """A remote-control command as Celery's pidbox carries it (no ``reply_to``: no reply)."""
    body: dict[str, Any] = {"method": method, "arguments": arguments,
                            "destination": list(destination) if destination else None,
                            "pattern": None, "matcher": None}
    if reply_to is not None:
        body.update(ticket=ticket, reply_to=reply_to)
    return body


class ControlLink(Closing):
    """Celery's monitoring protocols, on the broker: events and remote control (pidbox).

    Bodies are Celery's, as dicts; the broker carries them as Celery's tools expect (on
    RabbitMQ: the ``celeryev`` and ``celery.pidbox`` exchanges, so Flower and ``celery
    inspect`` see taskq workers). Used by one thread; :attr:`input` says when to
    :meth:`drain`. Also keeps revocations for a bounded time, for workers that start later.
    """

    input: Readiness
    tick_interval: float = 1.0

    # -- events
    @abc.abstractmethod
    def send_events(self, events: Sequence[dict[str, Any]]) -> None:
        """Publish events (best effort: nobody need listen, nothing waits for them)."""

    @abc.abstractmethod
    def watch_events(self) -> None:
        """Receive the events sent from now on (:meth:`events`)."""

    # -- remote control
    @abc.abstractmethod
    def serve(self, node: str) -> None:
        """Receive the commands broadcast from now on, as worker ``node`` (:meth:`commands`);
        each says itself whom it is for (``destination``)."""

    @abc.abstractmethod
    def answer(self, command: dict[str, Any], node: str, value: Any) -> None:
        """Send ``{node: value}`` to whoever sent ``command`` (if it wants replies)."""

    @abc.abstractmethod
    def call(self, method: str, arguments: dict[str, Any], *,
             destination: Sequence[str] | None = None, reply: bool = True,
             timeout: float = 1.0) -> str:
        """Broadcast a command; returns its ticket (its replies come to :meth:`replies`)."""

    @abc.abstractmethod
    def drain(self) -> None:
        """File what arrived (events, commands, replies); never blocks."""

    def events(self) -> list[dict[str, Any]]:
        """The events filed so far (taken)."""
        taken, self._events[:] = list(self._events), []
        return taken

    def commands(self) -> list[dict[str, Any]]:
        taken, self._commands[:] = list(self._commands), []
        return taken

    def replies(self, ticket: str) -> list[dict[str, Any]]:
        return self._replies.pop(ticket, [])

    def forget(self, ticket: str) -> None:
        """Done waiting for ``ticket``'s replies: later ones are dropped."""
        self._awaited.discard(ticket)
        self._replies.pop(ticket, None)

    def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` for input, and file it."""
        if not self.input.buffered():
            poller = select.poll()
            poller.register(self.input.fileno(), select.POLLIN)
            poller.poll(max(0, int(timeout * 1000)))
        self.drain()

    # -- revocations
    @abc.abstractmethod
    def store_revoked(self, task_ids: Sequence[str], until: float) -> None:
        """Keep ``task_ids`` as revoked until ``until`` (a time.time()); returns once kept."""

    @abc.abstractmethod
    def revoked(self) -> dict[str, float]:
        """The revocations kept now: ``{task_id: until}``."""

    @abc.abstractmethod
    def tick(self) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def __init__(self) -> None:
        self._events: list[dict[str, Any]] = []
        self._commands: list[dict[str, Any]] = []
        self._replies: dict[str, list[dict[str, Any]]] = {}
        #: The tickets of the commands whose replies are still waited for.
        self._awaited: set[str] = set()


class BeatLink(Closing):
    """A scheduler's link (``taskq beat``): which of the beats of a schedule is active, and
    which due times it fired. A context manager, used by one thread.

    ``schedule`` names an app's schedule (its ``beat_name``); ``entry`` one of its entries.
    The state of a schedule is, per entry, the latest due time handled (fired or skipped),
    kept in the broker.
    """

    #: How often :meth:`tick` must run while the link is open (seconds).
    tick_interval: float = 1.0

    @abc.abstractmethod
    def lead(self, schedule: str) -> bool:
        """Try to become the active scheduler of ``schedule`` (never blocks): True if this
        link is (or already was) it. Held until the link closes or its process dies, however
        it dies; a standby calls this again every fraction of a second."""

    @abc.abstractmethod
    def last_fired(self, schedule: str, entries: Sequence[str]) -> dict[str, float]:
        """The latest due time handled of each of ``entries`` that has one."""

    @abc.abstractmethod
    def fire(self, schedule: str, entry: str, due: float, envelope: Envelope | None) -> None:
        """Store the task message ``envelope`` (None: none, only the record) and record
        ``due`` as handled for ``entry``: both at once where the broker can. Where it can't
        and this process dies in between, the next active beat fires the same due time
        again, under the same task id; ``envelope`` is ``once``, so its task still runs once."""

    @abc.abstractmethod
    def tick(self) -> None:
        """Keep the link alive; raise if it was lost (an active beat then no longer is)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close (an active beat's schedule is free for a standby at once)."""


class WorkerSupport:
    """What a worker's supervisor does with its broker for its slots.

    Each slot keeps a run record (:mod:`taskq.broker.records`) of what it runs, in a file
    this object places; the supervisor reads it when the slot dies. A slot may also hand the
    supervisor a descriptor to hold (:meth:`SlotLink.hold_handle`): held until the
    supervisor has settled the slot's death, then closed. By default the records live in a
    temporary directory and a death needs nothing more.
    """

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="taskq-worker-")
        self._held: dict[int, int] = {}

    def run_record_path(self, index: int) -> str:
        return os.path.join(self._dir, f"slot-{index}.run")

    def slot_state(self, index: int) -> dict[str, str]:
        """What slot ``index`` passes to :meth:`Broker.slot_link` (picklable)."""
        return {}

    def recover(self) -> None:
        """At worker start, before slots run: settle what dead workers left behind."""

    def hold(self, index: int, fd: int) -> None:
        self.release(index)
        self._held[index] = fd

    def release(self, index: int) -> None:
        fd = self._held.pop(index, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def slot_exited(self, index: int, data: bytes, *, died: bool) -> None:
        """Slot ``index`` is gone (``died``: not by a clean stop) while its run record held
        ``data`` (b"": it ran nothing)."""
        self.release(index)

    def close(self) -> None:
        for index in list(self._held):
            self.release(index)
        shutil.rmtree(self._dir, ignore_errors=True)


class Broker(abc.ABC):
    """Opens the links each part of taskq needs; holds what they share."""

    #: Said when the broker can't be reached: what to check.
    unreachable_hint = "Is the broker running and reachable?"

    def __init__(self, config: Config) -> None:
        self.config = config

    @property
    def display_url(self) -> str:
        """The URL with any password masked: for logs and errors."""
        return self.config.display_url

    @property
    def location(self) -> str:
        """Where the broker is, for the worker's banner (the URL, or an absolute path)."""
        return self.display_url

    @abc.abstractmethod
    def client_link(self, *, timeout: float, name: str = "taskq client") -> ClientLink: ...

    @abc.abstractmethod
    def slot_link(
        self,
        queues: Sequence[str],
        on_delivery: DeliveryCallback,
        *,
        timeout: float,
        name: str = "taskq worker",
        state: dict[str, str] | None = None,
    ) -> SlotLink:
        """``state``: what :meth:`WorkerSupport.slot_state` gave this slot."""

    @abc.abstractmethod
    def admin(self, *, timeout: float) -> Admin: ...

    @abc.abstractmethod
    def control_link(self, *, timeout: float, name: str = "taskq control") -> ControlLink:
        """A link for Celery's monitoring protocols (events, remote control, revocations)."""

    @abc.abstractmethod
    def beat_link(self, *, timeout: float) -> BeatLink:
        """A link for a scheduler (``taskq beat``); ``timeout`` bounds opening it and each
        call on it."""

    def worker_support(self, name: str, concurrency: int) -> WorkerSupport:
        return WorkerSupport()

    def dead_letter_name(self, queue: str) -> str:
        """What ``taskq dlq`` calls the dead letters of ``queue``."""
        return f"{queue}.dlq"

    def check_queues(self, queues: Iterable[str], timeout: float) -> list[str]:
        """Make sure the worker can consume ``queues`` (raise DeclarationConflict and the like
        now, not in a restart loop); return warnings for the log."""
        link = self.slot_link(list(queues), lambda delivery: None, timeout=timeout,
                              name="taskq worker startup")
        link.close()
        return []

    @abc.abstractmethod
    def bind(self, queues: Iterable[str], patterns: Iterable[str], timeout: float) -> None:
        """Bind each of ``queues`` (which exist) to each topic pattern (``eu.orders.*``,
        ``eu.#``): messages sent with a routing key that matches then reach it. Bindings stay
        in the broker after the worker that made them stops."""

    @abc.abstractmethod
    def broadcast_queue(self, hostname: str) -> str:
        """The name of worker ``hostname``'s own queue for broadcasts (its slots consume it)."""

    @abc.abstractmethod
    def join_broadcasts(self, hostname: str, queues: Iterable[str], timeout: float) -> None:
        """Make the worker's broadcast queue receive what is broadcast to ``queues``, for as
        long as the worker lives."""

    @abc.abstractmethod
    def leave_broadcasts(self, hostname: str, timeout: float) -> None:
        """The worker stops: its broadcast queue goes (with what it had not run)."""

    def reach(self, open_link: Callable[[], L]) -> L:
        """``open_link()``, with a broker that can't be reached said in one line (a
        BrokerError naming the broker and what to check), for the CLI's commands."""
        try:
            return open_link()
        except BrokerError:
            raise
        except Exception as exc:
            if not self.is_recoverable(exc):
                raise
            raise BrokerError(
                f"could not reach the broker at {self.display_url} ({self.describe(exc)}). "
                f"{self.unreachable_hint}"
            ) from None

    @abc.abstractmethod
    def is_recoverable(self, exc: BaseException) -> bool:
        """Whether a new link may succeed after ``exc`` (the broker went away, timed out)."""

    @abc.abstractmethod
    def describe(self, exc: BaseException) -> str:
        """A short, password-free description of a link error."""

    def explain(self, exc: BaseException) -> str | None:
        """What the user should know about a lost link, if the cause is a known trap."""
        return None

    def after_fork(self) -> None:  # noqa: B027 - optional hook
        """In a child process: forget state that belongs to the parent."""
