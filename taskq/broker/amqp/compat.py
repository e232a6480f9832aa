"""The py-amqp that taskq drives: checked at import, so a mismatch is an error, not wrong bytes.

taskq uses py-amqp for the protocol (handshake, channels, method dispatch) and replaces parts
of its hot paths with its own code (:mod:`.frames`, :mod:`.properties`, the read-ahead in
:mod:`.connection`). Those parts lean on py-amqp internals: its item reader and writer, the
transport's receive function and read buffer, the connection's frame writer and frame
handler, a message's property loader, a channel's callback tables. This module checks they are
all there, with the shapes taskq calls, before anything runs; ``pyproject.toml`` pins the range
taskq is tested with (CI runs the tests on its oldest and newest versions).
"""

from __future__ import annotations

import inspect
import logging
import warnings
from typing import Any

import amqp
from amqp import serialization, transport

#: The range taskq is tested with (pyproject.toml pins the same).
TESTED = ((5, 1, 1), (5, 5, 0))
PIN = "amqp>=5.1.1,<5.5"

log = logging.getLogger("taskq.broker")


def _params(fn: Any) -> list[str]:
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return []


#: Where taskq reaches into py-amqp's code: (module, what its source must contain).
_SOURCE_NEEDS = (
    (transport, ("_quick_recv", "_read_buffer", "def read_frame")),
    (amqp.connection, ("self.frame_writer", "self.on_inbound_frame", "bytes_sent",
                       "bytes_recv")),
    (amqp.channel, ("self.callbacks = {}", "self.cancel_callbacks = {}")),
)


def _source(module: Any) -> str:
    try:
        return inspect.getsource(module)
    except (OSError, TypeError):
        return ""


def problems() -> list[str]:
    """What in the installed py-amqp is not what taskq expects (empty: all is well)."""
    found = []
    if _params(getattr(serialization, "_read_item", None))[:2] != ["buf", "offset"]:
        found.append("amqp.serialization._read_item(buf, offset)")
    if _params(getattr(serialization, "_write_item", None))[:3] != ["v", "write", "bits"]:
        found.append("amqp.serialization._write_item(v, write, bits)")
    if not callable(getattr(amqp.Message, "_load_properties", None)):
        found.append("amqp.Message._load_properties")
    if "frame_handler" not in _params(amqp.Connection.__init__):
        found.append("amqp.Connection(frame_handler=...)")
    for module, needs in _SOURCE_NEEDS:
        text = _source(module)
        found.extend(f"{module.__name__}: {need}" for need in needs if need not in text)
    return found


def _version() -> tuple[int, ...]:
    parts = []
    for part in str(getattr(amqp, "__version__", "0")).split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check() -> None:
    missing = problems()
    version = getattr(amqp, "__version__", "?")
    if missing:
        raise ImportError(
            f"taskq drives py-amqp's internals on its hot paths, and the installed amqp "
            f"{version} lacks what it needs ({'; '.join(missing)}). Install a version taskq "
            f"is tested with: pip install '{PIN}'"
        )
    if not TESTED[0] <= _version() < TESTED[1]:
        warnings.warn(
            f"taskq is tested with {PIN}, not amqp {version}; its internals look as expected, "
            "but pin a tested version to be sure",
            RuntimeWarning,
            stacklevel=2,
        )


check()
