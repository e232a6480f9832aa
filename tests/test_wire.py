"""The wire format's pure pieces, checked without a broker."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from decimal import Decimal

import amqp
import pytest
from amqp.serialization import decode_properties_basic

import taskq
from taskq.broker.amqp.properties import encode_properties
from taskq.message import exception_from_wire, exception_to_wire, task_envelope

PROPERTY_SETS = [
    {"content_type": "application/json", "content_encoding": "utf-8", "delivery_mode": 2},
    {"content_type": "application/json", "delivery_mode": 2, "correlation_id": "abc",
     "reply_to": "taskq.reply.x", "application_headers": {
         "lang": "py", "task": "tasks.add", "id": "abc", "parent_id": None, "retries": 3,
         "timelimit": [1.5, None], "ignore_result": True, "big": 2**40, "neg": -7,
         "nested": {"a": [1, "b", None, False]}, "unicode": "héllo ☃", "raw": b"\x00\xff",
         "when": datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc), "price": Decimal("1.25"),
     }},
    {"priority": 5, "expiration": "1000", "message_id": "m", "timestamp": 1_700_000_000,
     "type": "t", "user_id": "guest", "app_id": "taskq", "cluster_id": "c"},
    {"application_headers": {}},
]


@pytest.mark.parametrize("props", PROPERTY_SETS)
def test_properties_are_encoded_exactly_as_py_amqp_encodes_them(props: dict) -> None:
    assert encode_properties(props) == amqp.Message(b"", **props)._serialize_properties()


def test_encoded_properties_decode_back() -> None:
    props = PROPERTY_SETS[1]
    decoded, _ = decode_properties_basic(encode_properties(props), 0)
    assert decoded["correlation_id"] == "abc"
    assert decoded["application_headers"]["timelimit"] == [1.5, None]
    assert decoded["application_headers"]["unicode"] == "héllo ☃"


def test_a_task_message_carries_the_required_headers_and_only_meaningful_optional_ones() -> None:
    task_id = str(uuid.uuid4())
    plain = task_envelope(task_id=task_id, name="t.add", args=(1, 2), kwargs={}, queue="q",
                          serializer="json", reply_to="r")
    assert plain.headers == {"lang": "py", "task": "t.add", "id": task_id}
    later = task_envelope(task_id=task_id, name="t.add", args=(), kwargs={}, queue="q",
                          serializer="json", reply_to=None, retries=2, time_limit=5,
                          eta=datetime(2030, 1, 1, tzinfo=timezone.utc), ignore_result=True)
    assert later.headers["retries"] == 2 and later.headers["timelimit"] == [5, None]
    assert later.headers["eta"] == "2030-01-01T00:00:00+00:00"
    assert later.headers["ignore_result"] is True


@pytest.mark.parametrize("exc", [ValueError("bad", 2), KeyError("k"), OSError(2, "missing"),
                                 ZeroDivisionError("x")])
def test_builtin_exceptions_round_trip_as_themselves(exc: BaseException) -> None:
    rebuilt = exception_from_wire(exception_to_wire(exc), "Traceback ...")
    assert type(rebuilt) is type(exc) and rebuilt.args == exc.args


@pytest.mark.parametrize("name", ["SystemExit", "KeyboardInterrupt", "StopIteration",
                                  "GeneratorExit", "ExceptionGroup"])
def test_builtins_that_would_disturb_the_caller_arrive_as_remote_error(name: str) -> None:
    rebuilt = exception_from_wire(
        {"exc_type": name, "exc_module": "builtins", "exc_message": ["x"]}, None)
    assert isinstance(rebuilt, taskq.RemoteError) and rebuilt.exc_type == name


def test_celery_failure_types_map_onto_taskq_ones() -> None:
    rebuilt = exception_from_wire({"exc_type": "TimeLimitExceeded",
                                   "exc_module": "celery.exceptions", "exc_message": ["60"]}, None)
    assert isinstance(rebuilt, taskq.TimeLimitExceeded)
    odd = exception_from_wire({"exc_type": "Weird", "exc_module": "celery.exceptions"}, None)
    assert isinstance(odd, taskq.RemoteError)


def test_a_malformed_failure_is_still_an_error() -> None:
    assert isinstance(exception_from_wire("not a dict", None), taskq.RemoteError)
    assert isinstance(exception_from_wire({"exc_module": "builtins"}, None), taskq.RemoteError)


# -- the frame reader's property decoder, against py-amqp's own -----------------------------

def _both_decoders(raw: bytes) -> tuple[object, object]:
    from taskq.broker.amqp.frames import decode_properties

    return decode_properties(raw, 0)[0], decode_properties_basic(raw, 0)[0]


@pytest.mark.parametrize("props", PROPERTY_SETS)
def test_properties_decode_exactly_as_py_amqp_decodes_them(props: dict) -> None:
    ours, theirs = _both_decoders(amqp.Message(b"", **props)._serialize_properties())
    assert ours == theirs


def _table_property(*entries: bytes) -> bytes:
    """A properties blob holding only application_headers with hand-made entries."""
    import struct

    body = b"".join(entries)
    return struct.pack(">H", 0x2000) + struct.pack(">I", len(body)) + body


def _entry(key: bytes, kind: bytes, payload: bytes) -> bytes:
    return bytes([len(key)]) + key + kind + payload


def test_table_types_py_amqp_never_writes_decode_the_same() -> None:
    """Types other clients send ('b', 'B', 'u', 'U', 'i', 'l', 'f', 's', 'x', 'D', 'T'):
    decoded as py-amqp decodes them."""
    import struct

    raw = _table_property(
        _entry(b"b", b"b", struct.pack(">b", -5)),
        _entry(b"B", b"B", struct.pack(">B", 250)),
        _entry(b"U", b"U", struct.pack(">h", -300)),
        _entry(b"u", b"u", struct.pack(">H", 60000)),
        _entry(b"i", b"i", struct.pack(">I", 4_000_000_000)),
        _entry(b"l", b"l", struct.pack(">q", -1000)),
        _entry(b"L", b"L", struct.pack(">q", 2**40)),
        _entry(b"f", b"f", struct.pack(">f", 1.5)),
        _entry(b"x", b"x", struct.pack(">I", 3) + b"\x00\x01\x02"),
        _entry(b"D", b"D", struct.pack(">Bi", 2, 12345)),
        _entry(b"T", b"T", struct.pack(">Q", 1_700_000_000)),
        _entry(b"arr", b"A", struct.pack(">I", 7) + b"t\x01" + b"I" + struct.pack(">i", 9)),
    )
    ours, theirs = _both_decoders(raw)
    assert ours == theirs
    # Not UTF-8 (py-amqp 5.1 raises on both; 5.2 on gives bytes for both): a value comes out
    # as bytes, a key as its escaped text (no use downstream as bytes).
    from taskq.broker.amqp.frames import decode_properties

    raw = _table_property(_entry(b"bad", b"S", struct.pack(">I", 2) + b"\xff\xfe"),
                          _entry(b"\xff", b"V", b""),
                          _entry(b"s", b"s", struct.pack(">h", -2)))  # RabbitMQ's int16
    assert decode_properties(raw, 0)[0]["application_headers"] == {
        "bad": b"\xff\xfe", "\\xff": None, "s": -2}


_FLAVOURED = [
    datetime(2026, 12, 2, 13, 0, 5, 123456, tzinfo=timezone.utc),
    datetime(2026, 12, 2, 13, 0, 5),
    datetime(2026, 12, 2).date(),
    datetime(2026, 12, 2, 13, 0, 5, 7).time(),
    Decimal("3.14159265358979323846"),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    b"plain bytes",
    b"\xff\xfe not utf-8",
    {"nested": [Decimal("1.5"), {"when": datetime(2020, 1, 1, tzinfo=timezone.utc)}]},
    {"__type__": "only one of the two keys"},
]


@pytest.mark.parametrize("value", _FLAVOURED, ids=lambda v: type(v).__name__)
def test_json_is_encoded_exactly_as_kombu_encodes_it(value: object) -> None:
    """taskq writes Celery's JSON flavour itself (no kombu on the embedded path): the bytes
    must be kombu's, so a Celery peer reads them, and kombu's must read back the same."""
    from kombu.utils import json as kombu_json

    from taskq import serialization

    ours = serialization.encode("json", value)
    theirs = kombu_json.dumps(value, separators=(",", ":")).encode()
    if b'"version":null' in theirs:  # kombu < 5.4 also wrote a UUID's (empty) version
        assert serialization.decode("application/json", theirs, ("json",)) == value
    else:
        assert ours == theirs
    assert serialization.decode("application/json", ours, ("json",)) == value
    assert kombu_json.loads(ours) == value


def test_an_object_with_a_json_reducer_is_sent_as_what_it_returns() -> None:
    from taskq import serialization

    class Point:
        def __json__(self) -> list[int]:
            return [1, 2]

    assert serialization.encode("json", {"p": Point()}) == b'{"p":[1,2]}'


def test_an_unknown_json_type_marker_is_a_decode_error() -> None:
    from taskq import serialization

    with pytest.raises(taskq.DecodeError, match="unknown __type__ 'frobnicator'"):
        serialization.decode("application/json", b'{"__type__":"frobnicator","__value__":1}',
                             ("json",))
