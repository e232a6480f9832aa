"""Delayed messages held by RabbitMQ itself: a fixed ladder of TTL queues, no plugins.

Celery keeps countdown/ETA tasks unacked inside a worker, which breaks prefetch 1, loses their
place when the worker restarts and runs into RabbitMQ's consumer_timeout.  taskq keeps a delayed
message in the broker until it is due, in one of ``LEVELS`` durable queues shared by every work
queue of the vhost, whatever the mix of delays:

* level ``n`` is a queue whose messages expire after 2**n ms (``x-message-ttl``) and are then
  dead-lettered to level ``n - 1``'s exchange; level 0 dead-letters to the delivery exchange;
* a delayed message is published to the top level's *topic* exchange with the delay, in ms, as
  its routing key written in binary, one word per bit (``0.0.1.0....1``);
* level ``n``'s exchange sends a message whose bit ``n`` is 1 into level ``n``'s queue (to wait
  2**n ms) and one whose bit is 0 straight on to level ``n - 1``'s exchange (an
  exchange-to-exchange binding).  Dead-lettering keeps the routing key, so after its wait the
  message carries on down the ladder;
* the delivery exchange is a *headers* exchange with one binding per work queue, matching the
  ``x-taskq-delay-target`` header, so any queue name works.

A message thus waits exactly the sum of its set bits (its delay) plus a few ms per hop, passing
at most ``LEVELS`` queues.  A TTL queue holds messages of one TTL only, so they expire in
arrival order (RabbitMQ only expires messages at the head of a queue).  Delays longer than the
ladder (about 2.2 years) are capped; the worker re-delays whatever is still early.
"""

from __future__ import annotations

from typing import Any

from ...message import Envelope

LEVELS = 36
MAX_DELAY_MS = 2**LEVELS - 1
PREFIX = "taskq.delay"
DELIVERY_EXCHANGE = f"{PREFIX}.deliver"
TARGET_HEADER = "x-taskq-delay-target"
TOPOLOGY_MARKER = f"{PREFIX}:topology"


def level_name(n: int) -> str:
    """The name of level ``n``'s exchange and of its queue (they share it)."""
    return f"{PREFIX}.L{n:02d}"


def routing_key(delay_ms: int) -> str:
    """The delay in binary, most significant bit first, one topic word per bit."""
    delay_ms = max(1, min(MAX_DELAY_MS, delay_ms))
    return ".".join("1" if delay_ms >> bit & 1 else "0" for bit in range(LEVELS - 1, -1, -1))


def _pattern(n: int, bit: str) -> str:
    return "*." * (LEVELS - 1 - n) + bit + ".#"


def declare_topology(channel: Any) -> None:
    """Declare the ladder (idempotent): LEVELS + 1 exchanges, LEVELS queues."""
    channel.exchange_declare(DELIVERY_EXCHANGE, "headers", durable=True, auto_delete=False)
    for n in range(LEVELS):
        channel.exchange_declare(level_name(n), "topic", durable=True, auto_delete=False)
    for n in range(LEVELS):
        onward = level_name(n - 1) if n > 0 else DELIVERY_EXCHANGE
        name = level_name(n)
        channel.queue_declare(
            name,
            durable=True,
            auto_delete=False,
            arguments={"x-message-ttl": 2**n, "x-dead-letter-exchange": onward},
        )
        channel.queue_bind(name, name, routing_key=_pattern(n, "1"))
        channel.exchange_bind(destination=onward, source=name, routing_key=_pattern(n, "0"))


def bind_target(channel: Any, queue: str) -> None:
    """Let the delivery exchange hand due messages for ``queue`` to it."""
    channel.queue_bind(
        queue, DELIVERY_EXCHANGE, routing_key="", arguments={"x-match": "all", TARGET_HEADER: queue}
    )


def bind_consumed(channel: Any, queue: str, declared: set[str]) -> None:
    """A worker's binding for the queue it consumes, made on every connection.

    A queue deleted and declared again has lost its binding, and a publisher that bound it
    before would not know: due messages for it would find no route (they were accepted by
    the ladder, so ``mandatory`` can't report it). The worker that declares the queue binds it.
    """
    channel.exchange_declare(DELIVERY_EXCHANGE, "headers", durable=True, auto_delete=False)
    bind_target(channel, queue)
    declared.add(_bound_marker(queue))


def _bound_marker(queue: str) -> str:
    return f"{PREFIX}:bound:{queue}"


def route(channel: Any, envelope: Envelope, declared: set[str]) -> tuple[str, str]:
    """Where to publish ``envelope``: the default exchange, or the ladder if it is delayed.

    ``declared`` remembers (per process) that the ladder and the queue's binding exist.
    """
    if envelope.delay <= 0:
        return "", envelope.queue
    if TOPOLOGY_MARKER not in declared:
        declare_topology(channel)
        declared.add(TOPOLOGY_MARKER)
    marker = _bound_marker(envelope.queue)
    if marker not in declared:
        bind_target(channel, envelope.queue)
        declared.add(marker)
    envelope.headers[TARGET_HEADER] = envelope.queue
    return level_name(LEVELS - 1), routing_key(round(envelope.delay * 1000))
