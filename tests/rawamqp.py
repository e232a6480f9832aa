"""Raw AMQP 0-9-1 for hostile-message tests: publish any bytes, read back whatever arrives.

Client libraries refuse to send what the hostile-message tests need (non-UTF-8 short strings,
tables nested thousands deep, non-UTF-8 header keys) and crash on reading it back. This module
lets py-amqp do the handshake and the channel methods, and builds the content frames itself:

* :func:`encode_properties` / :func:`encode_table`: basic properties and field tables where a
  short string may be any bytes and a table may be nested arbitrarily deep (encoded with an
  explicit stack, not recursion: 5,000 levels would pass Python's recursion limit);
* :class:`RawPublisher`: ``basic.publish`` as hand-built frames on a confirm-mode channel,
  each publish waiting for the broker's ack, so a message the broker refused is an error here
  and not a silent loss;
* :func:`get_all`: take every message off a queue with a reader that cannot choke on what it
  finds (:func:`decode_properties`, iterative too).

Value types in tables (:func:`encode_value`): ``str`` is a UTF-8 long string ``S``, ``bytes`` a
long string of exactly those bytes, ``dict`` (or :class:`Pairs`, which may repeat a key) a
table ``F``, ``list``/``tuple`` an array ``A``, ``bool`` ``t``, ``None`` void ``V``, ``int``
``I`` (or ``l`` beyond 32 bits), ``float`` double ``d``; :class:`Raw` writes a type octet and
a payload as given (``b``, ``s``, ``f``, ``T``, ``x``, ``D``, ... or anything else). Keys are
``str`` (UTF-8) or ``bytes`` (as is).

A frame is: type (u8), channel (u16), payload size (u32), payload, 0xCE.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import amqp
from amqp import spec

FRAME_METHOD, FRAME_HEADER, FRAME_BODY = 1, 2, 3
FRAME_END = b"\xce"
BASIC_CLASS = 60

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_I32 = struct.Struct(">i")
_I64 = struct.Struct(">q")
_F64 = struct.Struct(">d")
_FRAME_HEAD = struct.Struct(">BHI")


@dataclass(frozen=True)
class Raw:
    """A table value written as its type octet and payload, whatever they are."""

    kind: bytes
    payload: bytes = b""


class Pairs(list):  # type: ignore[type-arg]
    """A table given as (key, value) pairs: keeps their order and may repeat a key."""


#: Basic-class properties in wire order: (name, flag, kind): s short string, F table,
#: o octet, L u64 timestamp.
PROPERTIES = (
    ("content_type", 0x8000, "s"),
    ("content_encoding", 0x4000, "s"),
    ("application_headers", 0x2000, "F"),
    ("delivery_mode", 0x1000, "o"),
    ("priority", 0x0800, "o"),
    ("correlation_id", 0x0400, "s"),
    ("reply_to", 0x0200, "s"),
    ("expiration", 0x0100, "s"),
    ("message_id", 0x0080, "s"),
    ("timestamp", 0x0040, "L"),
    ("type", 0x0020, "s"),
    ("user_id", 0x0010, "s"),
    ("app_id", 0x0008, "s"),
    ("cluster_id", 0x0004, "s"),
)
_PROPERTY_NAMES = frozenset(name for name, _, _ in PROPERTIES)


# -- encoding ------------------------------------------------------------------------------------


def shortstr(value: str | bytes | bytearray) -> bytes:
    raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    if len(raw) > 255:
        raise ValueError(f"a short string holds at most 255 bytes, not {len(raw)}")
    return _U8.pack(len(raw)) + raw


def longstr(value: str | bytes | bytearray) -> bytes:
    raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    return _U32.pack(len(raw)) + raw


def _scalar(value: Any) -> bytes:
    """A value that holds no other values: type octet + payload."""
    if isinstance(value, Raw):
        return value.kind + value.payload
    if isinstance(value, (str, bytes, bytearray)):
        return b"S" + longstr(value)
    if value is None:
        return b"V"
    if isinstance(value, bool):
        return b"t\x01" if value else b"t\x00"
    if isinstance(value, int):
        if -(2**31) <= value < 2**31:
            return b"I" + _I32.pack(value)
        return b"l" + _I64.pack(value)
    if isinstance(value, float):
        return b"d" + _F64.pack(value)
    raise TypeError(f"no AMQP field type for {type(value).__name__}")


def _items(table: Any) -> Iterable[tuple[Any, Any]]:
    return table if isinstance(table, Pairs) else table.items()


def _is_table(value: Any) -> bool:
    return isinstance(value, (dict, Pairs))


def _is_array(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and not isinstance(value, Pairs)


def _encode_container(root: Any) -> bytes:
    """u32 length + content of a table or an array, nested any depth, without recursion.

    Each stack entry is one open container: whether it is a table, its remaining entries, and
    the encoded parts so far; a finished container becomes one part of its parent.
    """
    def open_(value: Any) -> tuple[bool, Iterator[Any], list[bytes]]:
        table = _is_table(value)
        return table, iter(_items(value) if table else value), []

    stack = [open_(root)]
    while True:
        is_table, entries, parts = stack[-1]
        for entry in entries:
            if is_table:
                key, value = entry
                parts.append(shortstr(key))
            else:
                value = entry
            if _is_table(value) or _is_array(value):
                parts.append(b"F" if _is_table(value) else b"A")
                stack.append(open_(value))
                break  # the child first; this container's iterator resumes afterwards
            parts.append(_scalar(value))
        else:
            stack.pop()
            data = b"".join(parts)
            encoded = _U32.pack(len(data)) + data
            if not stack:
                return encoded
            stack[-1][2].append(encoded)


def encode_table(table: Any) -> bytes:
    """A field table: u32 length, then (short-string key, type octet, value)*."""
    if not _is_table(table):
        raise TypeError("a table is a dict or Pairs")
    return _encode_container(table)


def encode_value(value: Any) -> bytes:
    """One typed field value (type octet first)."""
    if _is_table(value):
        return b"F" + _encode_container(value)
    if _is_array(value):
        return b"A" + _encode_container(value)
    return _scalar(value)


def encode_properties(properties: dict[str, Any]) -> bytes:
    """Property flags (u16) and property list of the basic class; None values are left out.

    Short strings may be ``str`` or any ``bytes``; ``application_headers`` is a table, or
    ``bytes`` already encoded (length included) to send as is.
    """
    unknown = set(properties) - _PROPERTY_NAMES
    if unknown:
        raise ValueError(f"unknown basic properties: {sorted(unknown)}")
    flags = 0
    parts = []
    for name, flag, kind in PROPERTIES:
        value = properties.get(name)
        if value is None:
            continue
        flags |= flag
        if kind == "s":
            parts.append(shortstr(value))
        elif kind == "F":
            parts.append(bytes(value) if isinstance(value, bytes) else encode_table(value))
        elif kind == "o":
            parts.append(_U8.pack(value))
        else:
            parts.append(_U64.pack(value))
    return _U16.pack(flags) + b"".join(parts)


def frame(kind: int, channel: int, payload: bytes) -> bytes:
    return _FRAME_HEAD.pack(kind, channel, len(payload)) + payload + FRAME_END


def publish_frames(channel: int, exchange: str | bytes, routing_key: str | bytes,
                   body: bytes, properties: bytes, frame_max: int,
                   mandatory: bool = False, immediate: bool = False) -> bytes:
    """basic.publish (method, content header, body frames) as bytes.

    ``properties``: the encoded flags and property list (:func:`encode_properties`).
    """
    method = (_U16.pack(BASIC_CLASS) + _U16.pack(40) + _U16.pack(0) + shortstr(exchange)
              + shortstr(routing_key) + _U8.pack(int(mandatory) | int(immediate) << 1))
    header = _U16.pack(BASIC_CLASS) + _U16.pack(0) + _U64.pack(len(body)) + properties
    if len(header) + 8 > frame_max:
        raise ValueError(f"content header frame of {len(header) + 8} bytes is over the "
                         f"connection's frame_max ({frame_max}): the broker would refuse it")
    parts = [frame(FRAME_METHOD, channel, method), frame(FRAME_HEADER, channel, header)]
    chunk = frame_max - 8
    for start in range(0, len(body), chunk):
        parts.append(frame(FRAME_BODY, channel, body[start:start + chunk]))
    return b"".join(parts)


def header_frame_size(properties: bytes) -> int:
    """Bytes on the wire of the content header frame carrying these encoded properties."""
    return 8 + 12 + len(properties)  # frame head and end; class, weight, body size


# -- decoding (never chokes: bytes where text is not UTF-8, no recursion) -------------------


def _text(raw: bytes) -> str | bytes:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


_FIXED = {  # type octet: payload size, for the values read back as Raw
    b"b": 1, b"B": 1, b"s": 2, b"u": 2, b"U": 2, b"i": 4, b"f": 4, b"T": 8, b"L": 8, b"D": 5,
}


def _read_scalar(kind: bytes, buf: bytes, offset: int) -> tuple[Any, int]:
    if kind == b"S":
        size = _U32.unpack_from(buf, offset)[0]
        return _text(buf[offset + 4:offset + 4 + size]), offset + 4 + size
    if kind == b"x":
        size = _U32.unpack_from(buf, offset)[0]
        return Raw(kind, buf[offset:offset + 4 + size]), offset + 4 + size
    if kind == b"I":
        return _I32.unpack_from(buf, offset)[0], offset + 4
    if kind == b"l":
        return _I64.unpack_from(buf, offset)[0], offset + 8
    if kind == b"d":
        return _F64.unpack_from(buf, offset)[0], offset + 8
    if kind == b"V":
        return None, offset
    if kind == b"t" and buf[offset] in (0, 1):
        return bool(buf[offset]), offset + 1
    size = 1 if kind == b"t" else _FIXED.get(kind)
    if size is None:
        raise ValueError(f"unknown field type {kind!r} at offset {offset - 1}")
    return Raw(kind, buf[offset:offset + size]), offset + size


def decode_container(buf: bytes, offset: int, table: bool = True) -> tuple[Any, int]:
    """A table (dict; ``bytes`` keys where not UTF-8) or an array (list), at any depth."""
    root: Any = {} if table else []
    stack = [(root, offset + 4 + _U32.unpack_from(buf, offset)[0])]
    offset += 4
    while stack:
        container, limit = stack[-1]
        if offset >= limit:
            stack.pop()
            continue
        key = None
        if isinstance(container, dict):
            size = buf[offset]
            key = _text(buf[offset + 1:offset + 1 + size])
            offset += 1 + size
        kind = buf[offset:offset + 1]
        offset += 1
        if kind in (b"F", b"A"):
            value: Any = {} if kind == b"F" else []
            stack.append((value, offset + 4 + _U32.unpack_from(buf, offset)[0]))
            offset += 4
        else:
            value, offset = _read_scalar(kind, buf, offset)
        if key is None and isinstance(container, list):
            container.append(value)
        else:
            container[key] = value
    return root, offset


def decode_properties(buf: bytes, offset: int = 0) -> tuple[dict[str, Any], int]:
    flags = _U16.unpack_from(buf, offset)[0]
    offset += 2
    properties: dict[str, Any] = {}
    for name, flag, kind in PROPERTIES:
        if not flags & flag:
            continue
        if kind == "s":
            size = buf[offset]
            properties[name] = _text(buf[offset + 1:offset + 1 + size])
            offset += 1 + size
        elif kind == "F":
            properties[name], offset = decode_container(buf, offset)
        elif kind == "o":
            properties[name] = buf[offset]
            offset += 1
        else:
            properties[name] = _U64.unpack_from(buf, offset)[0]
            offset += 8
    return properties, offset


class RawMessage(amqp.Message):  # type: ignore[misc]
    """A received message whose properties :func:`decode_properties` read; the encoded
    flags and property list are kept as ``raw_properties``. Properties it can't read are
    reported as ``{"undecodable": "<why>"}`` rather than raised: reading never fails."""

    raw_properties = b""

    def _load_properties(self, class_id: int, buf: Any, offset: int) -> int:
        self.raw_properties = bytes(buf[offset:])
        try:
            self.properties, _ = decode_properties(self.raw_properties)
        except (ValueError, IndexError, struct.error) as exc:
            self.properties = {"undecodable": repr(exc)}
        return offset + len(self.raw_properties)


_CONTENT_METHODS = frozenset({spec.Basic.Deliver, spec.Basic.Return, spec.Basic.GetOk})


def frame_handler(connection: Any, callback: Any) -> Any:
    """py-amqp's content-frame state machine, building :class:`RawMessage` objects."""
    partial: dict[int, RawMessage] = {}

    def on_frame(received: tuple[int, int, Any]) -> bool:
        kind, channel, payload = received
        connection.bytes_recv += 1
        if kind == 8:
            return False
        if kind == FRAME_METHOD:
            method = struct.unpack_from(">HH", payload, 0)
            if method in _CONTENT_METHODS:
                partial[channel] = RawMessage(frame_method=method, frame_args=payload)
                return False
            callback(channel, method, payload, None)
            return True
        message = partial[channel]
        if kind == FRAME_HEADER:
            message.inbound_header(bytes(payload))
        else:
            message.inbound_body(bytes(payload))
        if not message.ready:
            return False
        del partial[channel]
        callback(channel, message.frame_method, message.frame_args, message)
        return True

    return on_frame


# -- the broker ----------------------------------------------------------------------------------


class BrokerRefused(AssertionError):
    """The broker did not take a hand-built message (a bug in the test's message, not in
    the code under test: the broker refuses what it can't parse)."""


def connect(host: str, vhost: str, userid: str = "guest", password: str = "guest",
            timeout: float = 10.0) -> amqp.Connection:
    conn = amqp.Connection(host, userid=userid, password=password, virtual_host=vhost,
                           connect_timeout=timeout, frame_handler=frame_handler)
    conn.connect()
    return conn


class RawPublisher:
    """Publishes hand-built frames on a confirm-mode channel; each publish waits for its
    confirm (or raises :class:`BrokerRefused`)."""

    def __init__(self, host: str, vhost: str, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self.connection = connect(host, vhost, timeout=timeout)
        self.channel = self.connection.channel()
        self.channel.confirm_select()
        self.channel.events["basic_ack"].add(self._on_ack)
        self.channel.events["basic_nack"].add(self._on_nack)
        self._sent = 0
        self._settled = 0
        self._nacked: list[int] = []

    @property
    def frame_max(self) -> int:
        return int(self.connection.frame_max)

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._settled = max(self._settled, tag)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self._nacked.append(tag)
        self._settled = max(self._settled, tag)

    def publish(self, routing_key: str | bytes, body: bytes,
                properties: dict[str, Any] | None = None, *, exchange: str | bytes = "",
                raw_properties: bytes | None = None) -> None:
        """Send one message and wait until the broker confirms it.

        ``raw_properties`` (encoded flags + list) replaces ``properties`` when given.
        """
        encoded = raw_properties if raw_properties is not None else encode_properties(
            properties or {})
        data = publish_frames(self.channel.channel_id, exchange, routing_key, body, encoded,
                              self.frame_max)
        self.connection.transport.write(data)
        self._sent += 1
        self.wait_for_confirms()

    def wait_for_confirms(self) -> None:
        deadline = time.monotonic() + self.timeout
        try:
            while self._settled < self._sent:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BrokerRefused(f"no confirm within {self.timeout}s")
                self.connection.drain_events(timeout=remaining)
        except (amqp.exceptions.AMQPError, OSError) as exc:
            raise BrokerRefused(f"the broker refused a hand-built message: {exc!r}") from exc
        if self._nacked:
            raise BrokerRefused(f"the broker nacked messages {self._nacked}")

    def close(self) -> None:
        try:
            self.connection.close()
        except Exception:  # the broker closed it already
            self.connection.collect()

    def __enter__(self) -> RawPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def get_all(host: str, vhost: str, queue: str, timeout: float = 10.0) -> list[RawMessage]:
    """Take every message off ``queue`` (no_ack), read with :class:`RawMessage`."""
    conn = connect(host, vhost, timeout=timeout)
    try:
        channel = conn.channel()
        channel.auto_decode = False
        messages = []
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            messages.append(message)
        return messages
    finally:
        conn.close()
