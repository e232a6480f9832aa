"""Reading and writing AMQP frames on taskq's own hot paths, with less Python than py-amqp.

Measured per task in a worker slot, py-amqp's generic machinery was most of the cost: the
properties of every delivery decoded field by field (its string helper called two dozen times
for a task message's headers), every outgoing frame packed with a format string built per
call, the socket's blocking mode switched twice per read. This module keeps py-amqp for the
protocol (handshake, channels, method dispatch) and replaces three pieces on taskq's
connections only:

* :func:`frame_handler`: the content-frame state machine (method, header, body), handed to
  ``amqp.Connection(frame_handler=...)``; its messages decode basic properties with
  :func:`decode_properties`, which reads the common table types itself and hands any other
  to py-amqp, so values come out as py-amqp would give them (``tests/test_wire.py``);
* :class:`Input` and :func:`read_waiting`: whether input is waiting (also input poll() can't
  see), and reading frames while it is, without touching socket modes;
* :func:`publish_frames` / :func:`ack_frame`: a publish (method, header, body) or an ack as
  bytes, to send several in one write.
"""

from __future__ import annotations

import math
import select
from collections.abc import Callable
from datetime import datetime, timezone
from struct import Struct
from typing import Any

import amqp
from amqp import spec
from amqp.exceptions import UnexpectedFrame
from amqp.serialization import _read_item as _amqp_read_item

from ...message import Delivery

_CONTENT_METHODS = frozenset({spec.Basic.Deliver, spec.Basic.Return, spec.Basic.GetOk})
_HH = Struct(">HH")
_U16 = Struct(">H").unpack_from
_U32 = Struct(">I").unpack_from
_I32 = Struct(">i").unpack_from
_I16 = Struct(">h").unpack_from
_U64 = Struct(">Q").unpack_from
_F64 = Struct(">d").unpack_from
_FRAME_HEAD = Struct(">BHI").pack
_CONTENT_HEAD = Struct(">HHQ").pack
_FRAME_END = b"\xce"
_PUBLISH_SIG = _HH.pack(*spec.Basic.Publish)
_ACK_SIG = _HH.pack(*spec.Basic.Ack)
_ACK_ARGS = Struct(">QB").pack
_BASIC = spec.Basic.CLASS_ID

# -- reading ---------------------------------------------------------------------------------
#
# Whatever bytes a publisher sent, decoding never raises out of here: a slot that fails on a
# message drops its connection, gets the same message again, and loops forever. Short strings
# that are not UTF-8 come out as bytes (as py-amqp does for long strings), header keys that are
# not UTF-8 as their escaped text, timestamps no datetime can hold as numbers; a header table
# nested deeper than MAX_DEPTH, or one py-amqp can't read, is skipped by its length and the
# reason kept (UNDECODABLE), so the slot can dead-letter the message with it.

#: How deep header tables and arrays may nest (RabbitMQ's own x-death is 3 deep).
MAX_DEPTH = 100
#: Set in a message's properties when its header table could not be read: why.
UNDECODABLE = "x-taskq-undecodable-headers"


class HostileInput(ValueError):
    """A header table taskq will not read (nested too deep, malformed)."""


def _text(buf: Any, start: int, end: int) -> str | bytes:
    raw = bytes(buf[start:end])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def _timestamp(buf: Any, offset: int) -> tuple[Any, int]:
    """A 'T' table value: a naive UTC datetime as py-amqp gives it, or the number itself when
    no datetime can hold it."""
    value = _U64(buf, offset)[0]
    try:
        return datetime.fromtimestamp(value, timezone.utc).replace(tzinfo=None), offset + 8
    except (OverflowError, OSError, ValueError):
        return value, offset + 8


#: Fixed-size table values: type octet -> (reader, size). 's' is a signed 16-bit integer, as
#: RabbitMQ means it (py-amqp 5.1 read a string there).
_FIXED: dict[int, tuple[Callable[[Any, int], Any], int]] = {
    0x74: (lambda buf, at: bool(buf[at]), 1),  # 't' boolean
    0x49: (lambda buf, at: _I32(buf, at)[0], 4),  # 'I' signed 32-bit
    0x64: (lambda buf, at: _F64(buf, at)[0], 8),  # 'd' double
    0x73: (lambda buf, at: _I16(buf, at)[0], 2),  # 's' signed 16-bit
}


def _item(buf: Any, offset: int, depth: int) -> tuple[Any, int]:
    """One typed table value: the common types here, the rest by py-amqp's rules."""
    kind = buf[offset]
    if kind == 0x53:  # 'S' long string (bytes if not UTF-8, as py-amqp does)
        size = _U32(buf, offset + 1)[0]
        start = offset + 5
        raw = bytes(buf[start : start + size])
        try:
            return raw.decode("utf-8"), start + size
        except UnicodeDecodeError:
            return raw, start + size
    if kind == 0x56:  # 'V' void
        return None, offset + 1
    fixed = _FIXED.get(kind)
    if fixed is not None:
        read, size = fixed
        return read(buf, offset + 1), offset + 1 + size
    if kind == 0x54:  # 'T' timestamp
        return _timestamp(buf, offset + 1)
    if kind == 0x46:  # 'F' table
        return _table(buf, offset + 1, depth + 1)
    if kind == 0x41:  # 'A' array
        if depth >= MAX_DEPTH:
            raise HostileInput(f"header tables nested deeper than {MAX_DEPTH}")
        size = _U32(buf, offset + 1)[0]
        offset += 5
        limit = offset + size
        values = []
        while offset < limit:
            value, offset = _item(buf, offset, depth + 1)
            values.append(value)
        return values, offset
    value, offset = _amqp_read_item(buf, offset)
    return value, offset


def _table(buf: Any, offset: int, depth: int = 0) -> tuple[dict[Any, Any], int]:
    if depth >= MAX_DEPTH:
        raise HostileInput(f"header tables nested deeper than {MAX_DEPTH}")
    size = _U32(buf, offset)[0]
    offset += 4
    limit = offset + size
    table: dict[Any, Any] = {}
    while offset < limit:
        key_size = buf[offset]
        raw = bytes(buf[offset + 1 : offset + 1 + key_size])
        offset += 1 + key_size
        key = raw.decode("utf-8", "backslashreplace")
        table[key], offset = _item(buf, offset, depth)
    if offset != limit:
        raise HostileInput("a header table's length does not match its contents")
    return table, offset


def _headers(buf: Any, offset: int, properties: dict[str, Any]) -> int:
    """Decode the header table at ``offset`` into ``properties``; if it can't be read, skip
    it by its length, with the reason under UNDECODABLE. Returns the offset after it."""
    end: int = offset + 4 + int(_U32(buf, offset)[0])
    try:
        properties["application_headers"], offset = _table(buf, offset)
    except Exception as exc:  # anything a hostile table makes a decoder raise
        properties["application_headers"] = {}
        properties[UNDECODABLE] = f"{type(exc).__name__}: {exc}"[:500]
    return end


#: Basic-class properties in wire order: (flag, name, kind).
_PROPERTIES = (
    (0x8000, "content_type", "s"),
    (0x4000, "content_encoding", "s"),
    (0x2000, "application_headers", "F"),
    (0x1000, "delivery_mode", "o"),
    (0x0800, "priority", "o"),
    (0x0400, "correlation_id", "s"),
    (0x0200, "reply_to", "s"),
    (0x0100, "expiration", "s"),
    (0x0080, "message_id", "s"),
    (0x0040, "timestamp", "L"),
    (0x0020, "type", "s"),
    (0x0010, "user_id", "s"),
    (0x0008, "app_id", "s"),
    (0x0004, "cluster_id", "s"),
)


def decode_properties(buf: Any, offset: int) -> tuple[dict[str, Any], int]:
    """The basic class's property flags and list, as py-amqp's decoder returns them (but
    never raising: see above)."""
    flags = _U16(buf, offset)[0]
    offset += 2
    properties: dict[str, Any] = {}
    for flag, name, kind in _PROPERTIES:
        if not flags & flag:
            continue
        if kind == "s":
            size = buf[offset]
            properties[name] = _text(buf, offset + 1, offset + 1 + size)
            offset += 1 + size
        elif kind == "F":
            offset = _headers(buf, offset, properties)
        elif kind == "o":
            properties[name] = buf[offset]
            offset += 1
        else:  # the timestamp property: a number, as py-amqp decodes it
            properties[name] = _U64(buf, offset)[0]
            offset += 8
    return properties, offset


class IncomingMessage(amqp.Message):  # type: ignore[misc]
    """A py-amqp message whose basic properties :func:`decode_properties` decodes."""

    def _load_properties(self, class_id: int, buf: Any, offset: int) -> int:
        if class_id != _BASIC:
            return int(super()._load_properties(class_id, buf, offset))
        self.properties, offset = decode_properties(buf, offset)
        return offset


def frame_handler(connection: Any, callback: Callable[..., Any]) -> Callable[[Any], bool]:
    """Assemble frames into methods (with content where they carry one) for py-amqp.

    Returns True once a whole method was handed to ``callback``, False for a partial one
    (or a heartbeat): the contract of py-amqp's own handler, which ``drain_events`` relies on.
    """
    #: Per channel, the message being assembled and whether its header frame arrived.
    partial: dict[int, list[Any]] = {}

    def on_frame(frame: tuple[int, int, Any]) -> bool:
        kind, channel, payload = frame
        connection.bytes_recv += 1
        if kind == 8:  # heartbeat: counted above
            return False
        entry = partial.get(channel)
        if kind == 1 and entry is None:
            method = _HH.unpack_from(payload, 0)
            if method in _CONTENT_METHODS:
                message = IncomingMessage(frame_method=method, frame_args=payload)
                partial[channel] = [message, False]
                return False
            callback(channel, method, payload, None)
            return True
        if entry is None or kind != (3 if entry[1] else 2):
            raise UnexpectedFrame(f"unexpected frame of type {kind} on channel {channel}")
        message = entry[0]
        if kind == 2:
            message.inbound_header(payload)
            entry[1] = True
        else:
            message.inbound_body(payload)
        if not message.ready:
            return False
        del partial[channel]
        callback(channel, message.frame_method, message.frame_args, message)
        return True

    return on_frame


class Input:
    """Whether a connection has input to handle, without reading it.

    ``poll()`` sees the socket only; bytes py-amqp already read ahead into its buffer, and TLS
    records already decrypted, are checked first. For one thread at a time (a poll object
    refuses concurrent use): other threads watch :meth:`fileno` with a poll object of their own.
    """

    def __init__(self, connection: Any) -> None:
        self._transport = connection.transport
        self._fd: int = connection.sock.fileno()
        self._poller = select.poll()  # not select(): that fails for descriptors > 1023
        self._poller.register(self._fd, select.POLLIN)

    def fileno(self) -> int:
        return self._fd

    def buffered(self) -> bool:
        """Bytes already read off the socket, which ``poll()`` won't report."""
        transport = self._transport
        pending = getattr(transport.sock, "pending", None)
        return bool(transport._read_buffer) or bool(pending and pending())

    def waiting(self) -> bool:
        """Anything to read now (never blocks)."""
        return self.buffered() or bool(self._poller.poll(0))

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds for input; whether there is some."""
        if self.buffered():
            return True
        return bool(self._poller.poll(max(0, math.ceil(timeout * 1000))))


def _usable(value: Any) -> str | None:
    """A property taskq can act on: a non-empty string (bytes that are not UTF-8 are kept in
    ``properties`` for the dead letter, but nothing is sent to or matched by them)."""
    return value if isinstance(value, str) and value else None


def delivery(message: Any, queue: str) -> Delivery:
    """A message py-amqp received (``basic.deliver`` or ``basic.get-ok``) as a Delivery."""
    info = message.delivery_info
    props = message.properties
    content_type = props.get("content_type")
    return Delivery(
        body=message.body,
        content_type=(
            content_type if content_type is None or isinstance(content_type, str)
            else repr(content_type)
        ),
        headers=props.get("application_headers") or {},
        correlation_id=_usable(props.get("correlation_id")),
        reply_to=_usable(props.get("reply_to")),
        redelivered=bool(info.get("redelivered")),
        queue=queue,
        exchange=info.get("exchange", ""),
        routing_key=info.get("routing_key", ""),
        tag=info["delivery_tag"],
        properties=props,
    )


def read_waiting(connection: Any, has_input: Callable[[], bool]) -> None:
    """Handle every frame that has started to arrive; never wait for one that hasn't.

    The socket is in blocking mode (py-amqp's default), so no mode switch per read: a frame
    that started arriving completes within microseconds.
    """
    read_frame = connection.transport.read_frame
    on_frame = connection.on_inbound_frame
    while has_input():
        on_frame(read_frame())


# -- writing -----------------------------------------------------------------------------------


def _frame(kind: int, channel: int, payload: bytes) -> bytes:
    return _FRAME_HEAD(kind, channel, len(payload)) + payload + _FRAME_END


def publish_frames(
    channel: int, publish_args: bytes, properties: bytes, body: bytes, frame_max: int
) -> bytes:
    """``basic.publish`` with its content: method, header and body frame(s), as bytes."""
    parts = [
        _frame(1, channel, _PUBLISH_SIG + publish_args),
        _frame(2, channel, _CONTENT_HEAD(_BASIC, 0, len(body)) + properties),
    ]
    chunk = max(1, frame_max - 8)
    for start in range(0, len(body), chunk):
        parts.append(_frame(3, channel, body[start : start + chunk]))
    return b"".join(parts)


def ack_frame(channel: int, delivery_tag: int) -> bytes:
    return _frame(1, channel, _ACK_SIG + _ACK_ARGS(delivery_tag, 0))
