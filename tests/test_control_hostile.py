"""Hostile remote-control commands: a worker's monitor answers the next good command.

Commands are published raw, as a buggy or hostile client would (RabbitMQ: to the
``celery.pidbox`` exchange; embedded: rows of the ``commands`` table): bytes that are not
JSON, JSON nested too deep to parse, fields of the wrong types, a reply to an exchange that
does not exist. Afterwards the worker answers every ping, its link was never dropped, and
(RabbitMQ) its node queue has one consumer, not a leaked second one taking turns.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from types import SimpleNamespace

import amqp

from .support import Broker, WorkerProcess, unique

DEEP = b'{"method": "ping", "arguments": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


def hostile_bodies(node: str) -> list[bytes]:
    reply = {"exchange": "reply.celery.pidbox", "routing_key": "nobody"}
    bodies: list[object] = [
        {"method": "ping", "destination": 5, "ticket": "t1", "reply_to": reply},
        {"method": "ping", "destination": True, "ticket": "t2", "reply_to": reply},
        {"method": "ping", "destination": f"x{node}.y", "ticket": "t3", "reply_to": reply},
        {"method": "ping", "expires": "abc", "ticket": "t4", "reply_to": reply},
        {"method": "ping", "ticket": "t5", "reply_to": {"exchange": "no-such-exchange",
                                                        "routing_key": "x"}},
        {"method": 123, "arguments": [1, 2], "ticket": "t6", "reply_to": reply},
        {"method": "revoke", "arguments": {"task_id": 7}, "ticket": "t7", "reply_to": reply},
        {"method": "add_consumer", "arguments": {"queue": ["a"]}, "ticket": "t8",
         "reply_to": reply},
        [1, 2, 3],
    ]
    return [b"\xff\xfe not json", DEEP, *(json.dumps(b).encode() for b in bodies)]


def send_raw(broker: Broker, bodies: list[bytes]) -> None:
    if broker.kind == "rabbitmq":
        with broker.channel() as ch:  # type: ignore[attr-defined]
            for body in bodies:
                ch.basic_publish(amqp.Message(body, content_type="application/json"),
                                 exchange="celery.pidbox", routing_key="")
        return
    db = sqlite3.connect(str(broker.path), timeout=30, isolation_level=None)  # type: ignore[attr-defined]
    try:
        for body in bodies:
            db.execute("INSERT INTO commands (at, body) VALUES (?, ?)",
                       (time.time(), body.decode("latin-1")))
    finally:
        db.close()


def test_hostile_commands_leave_the_worker_answering_on_one_link(
        broker: Broker, tasks: SimpleNamespace,
        start_worker: Callable[..., WorkerProcess]) -> None:
    """Given a worker, when every hostile command above arrives, then it still answers five
    pings in a row, runs a task, never dropped its link, and on RabbitMQ its node queue has
    exactly one consumer."""
    node = f"{unique('hostile')}@test"
    worker = start_worker("-n", node, concurrency=1)
    assert tasks.app.control.ping(destination=[node], timeout=5) == {node: {"ok": "pong"}}
    send_raw(broker, hostile_bodies(node))
    for _ in range(5):
        assert tasks.app.control.ping(destination=[node], timeout=5) == {node: {"ok": "pong"}}
    assert tasks.add.delay(2, 3).get(timeout=15) == 5
    log = worker.log()
    assert "lost its broker link" not in log and "Traceback" not in log, log
    if broker.kind == "rabbitmq":
        assert broker.queue_info(f"{node}.celery.pidbox")["consumers"] == "1"
