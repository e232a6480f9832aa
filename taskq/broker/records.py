"""What a worker slot is running, in a small shared file its supervisor reads.

The slot writes a record when it starts a task and clears it once the message is settled; the
supervisor reads it when the slot dies, to say which task killed it, and hands the broker's
part of it (opaque bytes: what the broker needs to count the lost run) to the broker. Backed
by a file (``mmap``), so it is memory for both and costs no system call per task; a broker
that needs it to outlive the whole worker keeps the file where the next worker finds it.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import time

SIZE = 4096
_LENGTH = struct.Struct("<I")


class RunRecord:
    def __init__(self, path: str) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < SIZE:
                os.ftruncate(fd, SIZE)
            self._map = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)

    def write(self, label: str, data: bytes = b"", arguments: str = "") -> None:
        """``arguments``: the start of the message's JSON body, for ``inspect active``."""
        record = {"label": label, "data": data.decode("latin-1"), "at": time.time(),
                  "args": arguments}
        payload = json.dumps(record).encode()
        if len(payload) > SIZE - _LENGTH.size and arguments:  # escapes made it too big
            record["args"] = ""
            payload = json.dumps(record).encode()
        payload = payload[: SIZE - _LENGTH.size]
        self._map[0 : _LENGTH.size] = _LENGTH.pack(0)  # a reader in between sees nothing
        self._map[_LENGTH.size : _LENGTH.size + len(payload)] = payload
        self._map[0 : _LENGTH.size] = _LENGTH.pack(len(payload))

    def clear(self) -> None:
        self._map[0 : _LENGTH.size] = _LENGTH.pack(0)

    def read(self) -> tuple[str, bytes]:
        """(label, data); ("", b"") when idle or unreadable (a write cut short by a kill)."""
        (length,) = _LENGTH.unpack(self._map[0 : _LENGTH.size])
        if not 0 < length <= SIZE - _LENGTH.size:
            return "", b""
        try:
            value = json.loads(self._map[_LENGTH.size : _LENGTH.size + length])
            return str(value["label"]), str(value["data"]).encode("latin-1")
        except (ValueError, KeyError, TypeError):
            return "", b""

    def started(self) -> float | None:
        """When the run recorded now started (time.time()), or None."""
        return self.details()[1]

    def details(self) -> tuple[str, float | None, str]:
        """(label, when it started, the start of its arguments' JSON); ("", None, "") when
        idle."""
        (length,) = _LENGTH.unpack(self._map[0 : _LENGTH.size])
        if not 0 < length <= SIZE - _LENGTH.size:
            return "", None, ""
        try:
            value = json.loads(self._map[_LENGTH.size : _LENGTH.size + length])
            return str(value["label"]), float(value["at"]), str(value.get("args") or "")
        except (ValueError, KeyError, TypeError):
            return "", None, ""

    def close(self) -> None:
        self._map.close()
