"""Names the embedded broker gives its own queues."""

from __future__ import annotations

from typing import Any

#: A worker's broadcast queue: ``taskq.worker.<hostname>.broadcasts``.
BROADCAST_PREFIX, BROADCAST_SUFFIX = "taskq.worker.", ".broadcasts"


def member_queue(hostname: str) -> str:
    return f"{BROADCAST_PREFIX}{hostname}{BROADCAST_SUFFIX}"


def is_member(queue: str) -> bool:
    """Whether ``queue`` is a worker's broadcast queue."""
    return queue.startswith(BROADCAST_PREFIX) and queue.endswith(BROADCAST_SUFFIX)


def home_queue(queue: str, headers: dict[Any, Any]) -> str:
    """The queue a message belongs to: for a broadcast in a worker's queue, the queue it was
    broadcast to (its dead letters go there); else the queue it came from."""
    home = headers.get("broadcast")
    if is_member(queue) and isinstance(home, str) and home:
        return home
    return queue
