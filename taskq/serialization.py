"""Codecs for message bodies: JSON by default, pickle only where a user opts in.

JSON here is kombu's flavour (the one Celery speaks): datetimes, dates, times, Decimals, UUIDs
and bytes travel as ``{"__type__": ..., "__value__": ...}`` envelopes and come back as
themselves, so values round-trip the same through a Celery peer. taskq writes and reads that
flavour itself (byte for byte kombu's, a test says so), so that a process on the embedded
broker never loads kombu.
"""

from __future__ import annotations

import base64
import json
import pickle
import uuid
from collections.abc import Callable
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any

from .errors import ContentDisallowed, DecodeError, EncodeError

JSON_CONTENT_TYPE = "application/json"
PICKLE_CONTENT_TYPE = "application/x-python-serialize"
CONTENT_TYPES = {"json": JSON_CONTENT_TYPE, "pickle": PICKLE_CONTENT_TYPE}
SERIALIZER_FOR = {v: k for k, v in CONTENT_TYPES.items()}


def _envelope(marker: str, value: Any) -> dict[str, Any]:
    return {"__type__": marker, "__value__": value}


def _json_default(value: Any) -> Any:
    """What JSON can't carry itself, as kombu writes it (``__json__`` first, as kombu does)."""
    reducer = getattr(value, "__json__", None)
    if reducer is not None:
        return reducer()
    if isinstance(value, datetime):  # before date: a datetime is a date
        return _envelope("datetime", value.isoformat())
    if isinstance(value, date):
        return _envelope("date", value.isoformat())
    if isinstance(value, time):
        return _envelope("time", value.isoformat())
    if isinstance(value, Decimal):
        return _envelope("decimal", str(value))
    if isinstance(value, uuid.UUID):
        return _envelope("uuid", {"hex": value.hex})
    if isinstance(value, bytes):
        try:
            return _envelope("bytes", value.decode("utf-8"))
        except UnicodeDecodeError:
            return _envelope("base64", base64.b64encode(value).decode("ascii"))
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_DECODERS: dict[str, Callable[[Any], Any]] = {
    "datetime": datetime.fromisoformat,
    "date": lambda text: datetime.fromisoformat(text).date(),
    "time": time.fromisoformat,
    "decimal": Decimal,
    "uuid": lambda fields: uuid.UUID(**fields),
    "bytes": lambda text: text.encode("utf-8"),
    "base64": lambda text: base64.b64decode(text.encode("ascii")),
}
_ENVELOPE_KEYS = {"__type__", "__value__"}


def _object_hook(obj: dict[str, Any]) -> Any:
    if obj.keys() != _ENVELOPE_KEYS:
        return obj
    decoder = _DECODERS.get(obj["__type__"])
    if decoder is None:
        raise ValueError(f"unknown __type__ {obj['__type__']!r}")
    return decoder(obj["__value__"])


_encode_json = json.JSONEncoder(default=_json_default, separators=(",", ":")).encode
_TYPE_MARKER = b'"__type__"'


def encode(serializer: str, value: Any) -> bytes:
    """Encode ``value``; raise :class:`EncodeError` (a TypeError) saying what could not go."""
    if serializer == "json":
        try:
            return _encode_json(value).encode()
        except (TypeError, ValueError) as exc:
            raise EncodeError(
                f"{exc}; JSON carries str, int, float, bool, None, list, dict "
                "(and datetime, Decimal, UUID, bytes): convert the value, or "
                "opt in to pickle with App(serializer='pickle', "
                "accept=('json', 'pickle'))"
            ) from exc
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise EncodeError(f"cannot pickle: {exc}") from exc


def decode(content_type: str | None, body: bytes, accept: tuple[str, ...]) -> Any:
    """Decode a body of ``content_type``; never unpickles unless "pickle" is in ``accept``."""
    serializer = SERIALIZER_FOR.get(content_type or "")
    if serializer is None or serializer not in accept:
        allowed = ", ".join(CONTENT_TYPES[name] for name in accept)
        raise ContentDisallowed(
            f"content type {content_type!r} is not accepted (accepted: {allowed})"
        )
    try:
        if serializer == "json":
            if _TYPE_MARKER in body:
                return json.loads(body, object_hook=_object_hook)
            return json.loads(body)
        return pickle.loads(body)
    except Exception as exc:
        raise DecodeError(f"cannot decode {content_type} body: {exc}") from exc


_EMBED_JSON = b',{"callbacks":null,"errbacks":null,"chain":null,"chord":null}]'
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def task_body(serializer: str, args: Any, kwargs: Any, what: str, embed: Any = None) -> bytes:
    """``[args, kwargs, embed]`` (protocol v2's body); the usual empty embed pre-encoded.

    ``embed``: a workflow's (``{"chain": [...], "chord": {...}, ...}``), or None for none."""
    if embed is not None:
        return check_encodable(serializer, [args, kwargs, {**_EMBED, **embed}], what)
    if serializer != "json":
        return check_encodable(serializer, [args, kwargs, _EMBED], what)
    try:
        return b"[" + _encode_json([args, kwargs])[1:-1].encode() + _EMBED_JSON
    except (TypeError, ValueError):
        return check_encodable(serializer, [args, kwargs, _EMBED], what)  # raises, naming it


def check_encodable(serializer: str, value: Any, what: str) -> bytes:
    """Encode ``value`` naming ``what`` it was in the error (e.g. "arguments of tasks.add")."""
    try:
        return encode(serializer, value)
    except EncodeError as exc:
        raise EncodeError(f"{what} can't be sent: {exc}") from exc.__cause__
