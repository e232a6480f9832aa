"""Codecs for message bodies: JSON by default, pickle only where a user opts in.

JSON here is kombu's flavour (the one Celery speaks): datetimes, dates, times, Decimals, UUIDs
and bytes travel as ``{"__type__": ..., "__value__": ...}`` envelopes and come back as
themselves, so values round-trip the same through a Celery peer.
"""

from __future__ import annotations

import json
import pickle
from typing import Any

from kombu.utils.json import JSONEncoder as _KombuJSONEncoder
from kombu.utils.json import object_hook as _kombu_object_hook

from .errors import ContentDisallowed, DecodeError, EncodeError

JSON_CONTENT_TYPE = "application/json"
PICKLE_CONTENT_TYPE = "application/x-python-serialize"
CONTENT_TYPES = {"json": JSON_CONTENT_TYPE, "pickle": PICKLE_CONTENT_TYPE}
SERIALIZER_FOR = {v: k for k, v in CONTENT_TYPES.items()}

_json_default = _KombuJSONEncoder().default
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
                return json.loads(body, object_hook=_kombu_object_hook)
            return json.loads(body)
        return pickle.loads(body)
    except Exception as exc:
        raise DecodeError(f"cannot decode {content_type} body: {exc}") from exc


_EMBED_JSON = b',{"callbacks":null,"errbacks":null,"chain":null,"chord":null}]'
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def task_body(serializer: str, args: Any, kwargs: Any, what: str) -> bytes:
    """``[args, kwargs, embed]`` (protocol v2's body); the constant embed pre-encoded."""
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
