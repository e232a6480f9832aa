"""Celery's monitoring protocols on RabbitMQ, as Celery declares them, so that Flower,
``celery events`` and ``celery inspect``/``control`` work with taskq workers unchanged.

* Events: JSON messages to the topic exchange ``celeryev`` (durable), routing key the type
  with dots (``task.succeeded``), transient, header ``hostname``. A watcher's queue is
  exclusive and bound with ``#``.
* Remote control (kombu's pidbox, namespace ``celery``): commands go to the fanout exchange
  ``celery.pidbox`` (not durable); a worker consumes ``<node>.celery.pidbox`` (auto-delete,
  expires 10 s, message TTL 300 s, as Celery's worker declares it). Replies ``{node: value}``
  go to the direct exchange ``reply.celery.pidbox``, routing key the sender's id, header
  ``ticket``; the sender reads ``<oid>.reply.celery.pidbox``.
* Revocations: persistent messages in the durable queue ``taskq.revoked``, one per task id
  with its own expiration (RabbitMQ drops it then); read by taking every message without an
  ack and closing the channel (they go back), one reader at a time (the exclusive consumer
  of ``taskq.revoked.lock``: two at once would each take a part).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from amqp import Message
from amqp import exceptions as amqp_errors

from ..base import ControlLink, command_body, decoded_body
from .channel import publish_args, raw_writer
from .connection import bound, close_quietly
from .consumer import plain_channel
from .frames import Input, publish_frames, read_waiting
from .properties import encode_properties

if TYPE_CHECKING:
    from . import AmqpBroker

EVENT_EXCHANGE = "celeryev"
PIDBOX_EXCHANGE, REPLY_EXCHANGE = "celery.pidbox", "reply.celery.pidbox"
NODE_QUEUE_ARGUMENTS = {"x-expires": 10_000, "x-message-ttl": 300_000}
REPLY_QUEUE_ARGUMENTS = {"x-expires": 10_000, "x-message-ttl": 10_000}
REVOKED_QUEUE = "taskq.revoked"
#: Readers of REVOKED_QUEUE take turns: the one with the exclusive consumer here reads.
REVOKED_LOCK = "taskq.revoked.lock"
#: Revocations kept at most (the oldest go first).
REVOKED_MAX = 100_000
JSON = "application/json"


class AmqpControl(ControlLink):
    def __init__(self, broker: AmqpBroker, timeout: float, name: str) -> None:
        super().__init__()
        self.timeout = timeout
        self.connection = broker.connector.connect_once(timeout=timeout, name=name)
        self.bound = bound(self.connection)
        try:
            with self.bound.until(self._deadline()):
                self.channel = plain_channel(self.connection)
        except BaseException:
            close_quietly(self.connection)
            raise
        self.bound.set(timeout)
        self.input = Input(self.connection)
        self._write = raw_writer(self.connection)
        heartbeat = float(self.connection.heartbeat or 0)
        self.tick_interval = heartbeat / 4 if heartbeat else 1.0
        self.oid = uuid.uuid4().hex
        self._declared: set[str] = set()
        self._clock = 0

    def _deadline(self) -> float:
        return time.monotonic() + self.timeout

    def _exchange(self, name: str, kind: str, durable: bool) -> None:
        if name not in self._declared:
            self.channel.exchange_declare(name, kind, durable=durable, auto_delete=False)
            self._declared.add(name)

    def _publish(self, body: Any, exchange: str, routing_key: str,
                 headers: dict[str, Any], delivery_mode: int = 1, **props: Any) -> None:
        message = Message(json.dumps(body, default=str).encode(), content_type=JSON,
                          content_encoding="utf-8", delivery_mode=delivery_mode,
                          application_headers=headers, **props)
        self.channel.basic_publish(message, exchange=exchange, routing_key=routing_key)

    # -- events ----------------------------------------------------------------------------

    def send_events(self, events: Sequence[dict[str, Any]]) -> None:
        """A batch of events in one write, framed by taskq's own encoders (py-amqp's
        basic_publish costs tens of µs a message, and a task makes three events)."""
        with self.bound.until(self._deadline()):
            self._exchange(EVENT_EXCHANGE, "topic", durable=True)
            frames = []
            channel_id, frame_max = self.channel.channel_id, self.connection.frame_max
            for event in events:
                properties = encode_properties({
                    "content_type": JSON, "content_encoding": "utf-8", "delivery_mode": 1,
                    "application_headers": {"hostname": str(event.get("hostname") or "")}})
                routing_key = str(event.get("type", "")).replace("-", ".")
                frames.append(publish_frames(
                    channel_id, publish_args(EVENT_EXCHANGE, routing_key, False), properties,
                    json.dumps(event, default=str).encode(), frame_max))
            self._write(b"".join(frames))

    def watch_events(self) -> None:
        with self.bound.until(self._deadline()):
            self._exchange(EVENT_EXCHANGE, "topic", durable=True)
            queue = f"celeryev.taskq.{self.oid}"
            self.channel.queue_declare(queue, durable=False, exclusive=True, auto_delete=True)
            self.channel.queue_bind(queue, EVENT_EXCHANGE, "#")
            self.channel.basic_consume(queue, no_ack=True,
                                       callback=lambda m: self._file(self._events, m))

    # -- remote control --------------------------------------------------------------------

    def serve(self, node: str) -> None:
        queue = f"{node}.celery.pidbox"
        with self.bound.until(self._deadline()):
            self._exchange(PIDBOX_EXCHANGE, "fanout", durable=False)
            self.channel.queue_declare(queue, durable=False, exclusive=False, auto_delete=True,
                                       arguments=NODE_QUEUE_ARGUMENTS)
            self.channel.queue_bind(queue, PIDBOX_EXCHANGE, "")
            self.channel.basic_consume(queue, no_ack=True, callback=self._on_command)

    def _on_command(self, message: Any) -> None:
        body = _decoded(message)
        expires = (message.properties.get("application_headers") or {}).get("expires")
        if isinstance(expires, (int, float)) and expires and expires < time.time():
            return  # Celery's rule: a command past its expiry is dropped
        if body:
            self._commands.append(body)

    def answer(self, command: dict[str, Any], node: str, value: Any) -> None:
        reply_to, ticket = command.get("reply_to"), command.get("ticket")
        if not isinstance(reply_to, dict) or not isinstance(ticket, str):
            return
        self._clock += 1
        with self.bound.until(self._deadline()):
            self._exchange(REPLY_EXCHANGE, "direct", durable=False)
            # only to Celery's reply exchange (a command naming another can't make a worker
            # publish anywhere else, nor make its channel fail on an exchange that isn't)
            self._publish({node: value}, REPLY_EXCHANGE,
                          str(reply_to.get("routing_key") or ""),
                          {"ticket": ticket, "clock": self._clock})

    def call(self, method: str, arguments: dict[str, Any], *,
             destination: Sequence[str] | None = None, reply: bool = True,
             timeout: float = 1.0) -> str:
        ticket = uuid.uuid4().hex
        reply_to = {"exchange": REPLY_EXCHANGE, "routing_key": self.oid} if reply else None
        body = command_body(method, arguments, destination, ticket, reply_to)
        self._clock += 1
        with self.bound.until(self._deadline()):
            self._exchange(PIDBOX_EXCHANGE, "fanout", durable=False)
            if reply:
                self._reply_queue()
                self._awaited.add(ticket)
            self._publish(body, PIDBOX_EXCHANGE, "",
                          {"clock": self._clock, "expires": time.time() + timeout})
        return ticket

    def _reply_queue(self) -> None:
        queue = f"{self.oid}.reply.celery.pidbox"
        if queue in self._declared:
            return
        self._exchange(REPLY_EXCHANGE, "direct", durable=False)
        self.channel.queue_declare(queue, durable=False, exclusive=False, auto_delete=True,
                                   arguments=REPLY_QUEUE_ARGUMENTS)
        self.channel.queue_bind(queue, REPLY_EXCHANGE, self.oid)
        self.channel.basic_consume(queue, no_ack=True, callback=self._on_reply)
        self._declared.add(queue)

    def _on_reply(self, message: Any) -> None:
        ticket = (message.properties.get("application_headers") or {}).get("ticket")
        body = _decoded(message)
        if isinstance(ticket, str) and body and ticket in self._awaited:
            self._replies.setdefault(ticket, []).append(body)

    def _file(self, into: list[dict[str, Any]], message: Any) -> None:
        body = _decoded(message)
        if body:
            into.append(body)

    def drain(self) -> None:
        with self.bound.until(self._deadline()):
            read_waiting(self.connection, self.input.waiting)

    # -- revocations -----------------------------------------------------------------------

    def _revoked_queue(self, channel: Any) -> None:
        channel.queue_declare(REVOKED_QUEUE, durable=True, exclusive=False, auto_delete=False,
                              arguments={"x-max-length": REVOKED_MAX})

    def store_revoked(self, task_ids: Sequence[str], until: float) -> None:
        with self.bound.until(self._deadline()):
            channel = plain_channel(self.connection)
            try:
                channel.confirm_select()
                self._revoked_queue(channel)
                ttl = max(1, int((until - time.time()) * 1000))
                for task_id in task_ids:
                    message = Message(json.dumps({"task_id": task_id, "until": until}).encode(),
                                      content_type=JSON, delivery_mode=2, expiration=str(ttl))
                    channel.basic_publish_confirm(message, exchange="", routing_key=REVOKED_QUEUE)
            finally:
                if channel.is_open:
                    channel.close()

    def revoked(self) -> dict[str, float]:
        found: dict[str, float] = {}
        now = time.time()
        deadline = self._deadline()
        with self.bound.until(deadline):
            channel = self._revoked_lock(deadline)
            try:
                while (message := channel.basic_get(REVOKED_QUEUE, no_ack=False)) is not None:
                    body = _decoded(message)
                    task_id, until = body.get("task_id"), body.get("until")
                    if isinstance(task_id, str) and isinstance(until, (int, float)) \
                            and until >= now:
                        found[task_id] = max(float(until), found.get(task_id, 0.0))
            finally:
                if channel.is_open:
                    channel.close()  # what it took goes back, and the lock goes
        return found

    def _revoked_lock(self, deadline: float) -> Any:
        """A channel holding the readers' lock: an exclusive consumer on a lock queue (a
        reader takes every revocation without acking it, so two at once would each see a
        part)."""
        while True:
            channel = plain_channel(self.connection)
            self._revoked_queue(channel)
            channel.queue_declare(REVOKED_LOCK, durable=True, exclusive=False,
                                  auto_delete=False)
            try:
                channel.basic_consume(REVOKED_LOCK, callback=_never, exclusive=True)
                return channel
            except (amqp_errors.AccessRefused, amqp_errors.ResourceLocked):
                if time.monotonic() > deadline:  # the broker closed that channel
                    raise TimeoutError("could not read the stored revocations: other "
                                       "workers kept reading them") from None
                time.sleep(0.01)  # another worker reads them now

    def tick(self) -> None:
        with self.bound.until(self._deadline()):
            self.connection.heartbeat_tick()

    def close(self) -> None:
        close_quietly(self.connection)


def _decoded(message: Any) -> dict[str, Any]:
    return decoded_body(message.body)


def _never(message: Any) -> None:  # nothing is ever published to the lock queue
    """Consumes the lock queue."""
