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
  ``taskq-delay-target`` header, so any queue name works. (Not an ``x-`` name: a headers
  exchange ignores binding arguments that start with ``x-``, so such a binding matches
  every message. taskq 0.1 fell into that trap, see :func:`repair_legacy`.)

A message thus waits exactly the sum of its set bits (its delay) plus a few ms per hop, passing
at most ``LEVELS`` queues.  A TTL queue holds messages of one TTL only, so they expire in
arrival order (RabbitMQ only expires messages at the head of a queue).  Delays longer than the
ladder (about 2.2 years) are capped; the worker re-delays whatever is still early.

The ladder's queues are classic queues on the node that declared them: in a cluster, delayed
messages wait on that one node (they survive its restart, not its loss).
"""

from __future__ import annotations

import logging
from typing import Any

from amqp import exceptions as amqp_errors

from ...message import Envelope
from .topology import TOPIC_EXCHANGE, broadcast_exchange

log = logging.getLogger("taskq.broker")

LEVELS = 36
MAX_DELAY_MS = 2**LEVELS - 1
PREFIX = "taskq.delayed"
DELIVERY_EXCHANGE = f"{PREFIX}.deliver"
TARGET_HEADER = "taskq-delay-target"
TOPOLOGY_MARKER = f"{PREFIX}:topology"

#: taskq 0.1's ladder ended in this exchange, bound per queue with an ``x-`` header (a catch-all).
LEGACY_EXCHANGE = "taskq.delay.deliver"
LEGACY_HEADER = "x-taskq-delay-target"
LEGACY_ABSENT = "taskq.delay:legacy-absent"


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
    """Declare the ladder (idempotent): LEVELS + 1 exchanges, LEVELS queues and their
    bindings, pipelined (``nowait``): one round trip to the broker, not 145."""
    channel.exchange_declare(
        DELIVERY_EXCHANGE, "headers", durable=True, auto_delete=False, nowait=True
    )
    for n in range(LEVELS):
        channel.exchange_declare(level_name(n), "topic", durable=True, auto_delete=False,
                                 nowait=True)
    for n in range(LEVELS):
        onward = level_name(n - 1) if n > 0 else DELIVERY_EXCHANGE
        name = level_name(n)
        channel.queue_declare(
            name,
            durable=True,
            auto_delete=False,
            arguments={"x-message-ttl": 2**n, "x-dead-letter-exchange": onward},
            nowait=True,
        )
        channel.queue_bind(name, name, routing_key=_pattern(n, "1"), nowait=True)
        channel.exchange_bind(
            destination=onward, source=name, routing_key=_pattern(n, "0"), nowait=True
        )
    # Any refusal above closed the channel: this answer (or the error) says how it went.
    channel.exchange_declare(DELIVERY_EXCHANGE, "headers", passive=True)


def bind_target(channel: Any, queue: str, declared: set[str]) -> None:
    """Let the delivery exchange hand due messages for ``queue`` to it (and only those)."""
    channel.queue_bind(
        queue, DELIVERY_EXCHANGE, routing_key="", arguments={"x-match": "all", TARGET_HEADER: queue}
    )
    repair_legacy(channel.connection, queue, declared)


def repair_legacy(connection: Any, queue: str, declared: set[str]) -> None:
    """Replace taskq 0.1's catch-all binding of ``queue`` by one that matches its own messages.

    taskq 0.1 bound ``queue`` to its delivery exchange with ``{x-match: all,
    x-taskq-delay-target: queue}``, which matches every message, so each delayed message was
    copied into every such queue. New messages take the new ladder; messages still waiting in
    the old one reach ``queue`` through ``all-with-x`` (which does compare ``x-`` headers,
    RabbitMQ 3.10+). Where that is refused the old binding stays, and a warning says so.
    Done once per process and queue, on a channel of its own (a refusal closes it).
    """
    marker = f"{PREFIX}:repaired:{queue}"
    if LEGACY_ABSENT in declared or marker in declared:
        return
    channel = connection.channel()
    try:
        try:
            channel.exchange_declare(LEGACY_EXCHANGE, "headers", passive=True)
        except amqp_errors.NotFound:
            declared.add(LEGACY_ABSENT)
            return
        try:
            channel.queue_bind(
                queue, LEGACY_EXCHANGE, arguments={"x-match": "all-with-x", LEGACY_HEADER: queue}
            )
        except amqp_errors.AMQPError as exc:
            log.warning(
                "queue %s is still bound to %s so that it matches every message (taskq 0.1's "
                "binding): the broker refused the precise one (%s). Delayed messages sent by "
                "taskq 0.1 may be copied into it; new ones are not.",
                queue,
                LEGACY_EXCHANGE,
                exc,
            )
            declared.add(marker)
            return
        channel.queue_unbind(
            queue, LEGACY_EXCHANGE, arguments={"x-match": "all", LEGACY_HEADER: queue}
        )
        declared.add(marker)
    finally:
        if channel.is_open:
            channel.close()


def bind_consumed(channel: Any, queue: str, declared: set[str]) -> None:
    """A worker's binding for the queue it consumes, made on every connection.

    A queue deleted and declared again has lost its binding, and a publisher that bound it
    before would not know: due messages for it would find no route (they were accepted by
    the ladder, so ``mandatory`` can't report it). The worker that declares the queue binds it.
    """
    channel.exchange_declare(DELIVERY_EXCHANGE, "headers", durable=True, auto_delete=False)
    bind_target(channel, queue, declared)
    declared.add(_bound_marker(queue))


def _bound_marker(queue: str) -> str:
    return f"{PREFIX}:bound:{queue}"


def route(channel: Any, envelope: Envelope, declared: set[str]) -> tuple[str, str]:
    """Where to publish ``envelope``: the default exchange, or the ladder if it is delayed.

    ``declared`` remembers (per process) that the ladder and the queue's binding exist.
    """
    if envelope.routing_key is not None:  # (never delayed: the App refuses that)
        return TOPIC_EXCHANGE, envelope.routing_key
    if envelope.broadcast:
        return broadcast_exchange(envelope.queue), ""
    if envelope.delay <= 0:
        return "", envelope.queue
    if TOPOLOGY_MARKER not in declared:
        declare_topology(channel)
        declared.add(TOPOLOGY_MARKER)
    marker = _bound_marker(envelope.queue)
    if marker not in declared:
        bind_target(channel, envelope.queue, declared)
        declared.add(marker)
    envelope.headers[TARGET_HEADER] = envelope.queue
    return level_name(LEVELS - 1), routing_key(round(envelope.delay * 1000))
