"""A confirm-mode channel: publishing with ``mandatory``, tracking confirms and returns.

py-amqp's own confirm mode waits for every publish on its own; tracking sequence numbers here
lets one code path confirm a single message (``.delay()``) or pipeline thousands (batches).
Waiting for confirms polls the socket and reads what arrived, with no socket mode switches.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

import amqp
from amqp.serialization import dumps

from ...message import Envelope
from . import delays
from .frames import Input, publish_frames, read_waiting
from .properties import encode_properties

_MISSING = object()
_publish_args: dict[tuple[str, str, bool], bytes] = {}


def publish_args(exchange: str, routing_key: str, mandatory: bool) -> bytes:
    """``basic.publish`` method arguments, encoded once per destination.

    py-amqp encodes them again for every message, in Python; a client sends to few
    destinations (its queues), a worker to its callers' reply queues.
    """
    key = (exchange, routing_key, mandatory)
    args = _publish_args.get(key)
    if args is None:
        args = dumps("Bssbb", (0, exchange, routing_key, mandatory, False))
        if len(_publish_args) < 4096:
            _publish_args[key] = args
    return args


_CONTENT_ENCODING = {"application/json": "utf-8"}


def message_properties(
    content_type: str | None,
    headers: dict[str, Any],
    correlation_id: str | None,
    reply_to: str | None,
    *,
    content_encoding: str | None = None,
    priority: int | None = None,
) -> dict[str, Any]:
    """Basic properties of a persistent message."""
    props: dict[str, Any] = {"delivery_mode": 2, "application_headers": headers}
    if priority:
        props["priority"] = priority
    if content_type:
        props["content_type"] = content_type
        props["content_encoding"] = content_encoding or _CONTENT_ENCODING.get(
            content_type, "binary"
        )
    elif content_encoding:
        props["content_encoding"] = content_encoding
    if correlation_id:
        props["correlation_id"] = correlation_id
    if reply_to:
        props["reply_to"] = reply_to
    return props


def raw_writer(connection: Any) -> Callable[[bytes], None]:
    """Write encoded frames to a connection's socket (counted for heartbeats)."""
    transport = connection.transport

    def write(data: bytes) -> None:
        transport.write(data)
        connection.bytes_sent += 1

    return write


class ConfirmChannel:
    """One channel in confirm mode on a connection used by one thread at a time."""

    def __init__(
        self, connection: amqp.Connection, write: Callable[[bytes], None] | None = None
    ) -> None:
        self.connection = connection
        self.write = write or raw_writer(connection)
        self.channel = connection.channel()
        self.channel.auto_decode = False
        self.channel.confirm_select()
        # Waiting for confirms: poll the socket, read what arrived (no socket mode switches).
        self._input = Input(connection)
        self._seq = 0
        #: Sequence numbers not yet confirmed, in publish order, with the key to report.
        self.outstanding: dict[int, str | None] = {}
        self.nacked: set[int] = set()
        #: Correlation ids of messages the broker returned as unroutable, with the reason.
        self.returned: dict[str | None, str] = {}
        events = self.channel.events
        events["basic_ack"].add(self._on_ack)
        events["basic_nack"].add(self._on_nack)
        events["basic_return"].add(self._on_return)

    # -- sending ------------------------------------------------------------------------------

    def send(
        self,
        body: bytes,
        properties: dict[str, Any],
        exchange: str,
        routing_key: str,
        key: str | None,
    ) -> int:
        """Publish with ``mandatory``; return the sequence number its confirm will carry."""
        self.write(
            publish_frames(
                self.channel.channel_id,
                publish_args(exchange, routing_key, True),
                encode_properties(properties),
                body,
                self.connection.frame_max,
            )
        )
        self._seq += 1
        self.outstanding[self._seq] = key
        return self._seq

    def send_envelope(self, envelope: Envelope, exchange: str = "", routing_key: str = "") -> int:
        properties = message_properties(
            envelope.content_type,
            envelope.headers,
            envelope.correlation_id,
            envelope.reply_to,
            content_encoding=envelope.content_encoding,
            priority=envelope.priority,
        )
        return self.send(
            envelope.body,
            properties,
            exchange,
            routing_key or envelope.queue,
            envelope.correlation_id,
        )

    def send_routed(self, envelope: Envelope, declared: set[str]) -> int:
        """Send one envelope (a delayed one through the delay queues); its sequence number."""
        exchange, routing_key = delays.route(self.channel, envelope, declared)
        return self.send_envelope(envelope, exchange, routing_key)

    def refusal(self, seq: int, correlation_id: str | None) -> str:
        """Why the broker did not take message ``seq`` ("" if it did): call once settled."""
        reason = self.returned.pop(correlation_id, None) or ""
        if seq in self.nacked:
            self.nacked.discard(seq)
            reason = reason or "nacked: the broker could not store it"
        return reason

    def publish_and_wait(self, envelope: Envelope, declared: set[str], deadline: float) -> str:
        """Send one envelope (delayed ones through the ladder) and wait for its confirm.

        Returns "" if the broker took it, else why not (returned as unroutable, or nacked).
        """
        seq = self.send_routed(envelope, declared)
        self.wait_until(seq, deadline)
        return self.refusal(seq, envelope.correlation_id)

    # -- confirms -----------------------------------------------------------------------------

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self.nacked.update(self._settle(tag, multiple))

    def _settle(self, tag: int, multiple: bool) -> list[int]:
        if not multiple:
            return [tag] if self.outstanding.pop(tag, _MISSING) is not _MISSING else []
        done = list(itertools.takewhile(lambda seq: seq <= tag, self.outstanding))
        for seq in done:
            del self.outstanding[seq]
        return done

    def _on_return(self, exc: Any, exchange: str, routing_key: str, message: Any) -> None:
        key = message.properties.get("correlation_id")
        where = f"exchange {exchange!r}" if exchange else "the default exchange"
        self.returned[key] = (
            f"no queue is bound for routing key {routing_key!r} on {where} ({exc.reply_text})"
        )

    def poll(self) -> None:
        """Handle whatever frames (confirms, returns) already arrived, without waiting."""
        read_waiting(self.connection, self._input.waiting)

    def wait_until(
        self, last_seq: int, deadline: float, give_up: Callable[[], bool] | None = None
    ) -> bool:
        """Process frames until every sequence number up to ``last_seq`` is settled.

        Raises ``TimeoutError`` (recoverable: the caller drops this connection) at ``deadline``.
        Returns False, unsettled, as soon as ``give_up()`` says so (e.g. the broker blocks).
        """
        outstanding = self.outstanding
        while outstanding and next(iter(outstanding)) <= last_seq:
            if give_up is not None and give_up():
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0 and not self._input.buffered():
                raise TimeoutError("timed out waiting for the broker's publish confirm")
            if self._input.wait(min(remaining, 0.25) if give_up else remaining):
                read_waiting(self.connection, self._input.waiting)
        return True

    def settled(self, seq: int) -> bool:
        return seq not in self.outstanding
