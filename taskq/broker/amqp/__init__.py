"""RabbitMQ (AMQP 0-9-1): the broker for many machines."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from ...config import Config
from ..base import Admin, BeatLink, Broker, ControlLink, DeliveryCallback, WorkerSupport
from . import compat, letters, topology
from .admin import QueueAdmin
from .client import ClientConnection
from .connection import Connector, bound, close_quietly, describe, is_recoverable
from .consumer import SlotConnection
from .journal import Spool, hold_lock

__all__ = ["AmqpBroker"]

del compat  # imported first thing among ours: it checks the py-amqp taskq drives


class AmqpBroker(Broker):
    """Makes the connections each part of taskq needs; holds what they share."""

    unreachable_hint = "Is RabbitMQ running and reachable?"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.connector = Connector(config)
        #: Queues some publisher of this process has declared: declare once, not per message.
        self.declared: set[str] = set()
        #: This process's share of its worker's journal lock (slot processes hold one).
        self._journal_lock: Any = None

    def client_link(self, *, timeout: float, name: str = "taskq client") -> ClientConnection:
        """A connection for publishing (and, on one per process, for reading replies)."""
        return ClientConnection(self.connector, self.declared, timeout=timeout, name=name)

    def slot_link(
        self,
        queues: Sequence[str],
        on_delivery: DeliveryCallback,
        *,
        timeout: float,
        name: str = "taskq worker",
        state: dict[str, str] | None = None,
    ) -> SlotConnection:
        state = state or {}
        if "lock" in state and self._journal_lock is None:
            self._journal_lock = hold_lock(state["lock"])
        return SlotConnection(
            self.connector,
            queues,
            on_delivery,
            timeout=timeout,
            declared=self.declared,
            name=name,
            spool=Spool(state["spool"]) if "spool" in state else None,
        )

    def check_queues(self, queues: Iterable[str], timeout: float) -> list[str]:
        link = self.slot_link(list(queues), lambda delivery: None, timeout=timeout,
                              name="taskq worker startup")
        link.close()
        return link.warnings

    def bind(self, queues: Iterable[str], patterns: Iterable[str], timeout: float) -> None:
        connection = self.connector.connect_once(timeout=timeout, name="taskq worker bindings")
        try:
            with bound(connection).until(time.monotonic() + timeout):
                channel = connection.channel()
                topology.declare_topic_exchange(channel)
                for queue in queues:
                    for pattern in patterns:
                        channel.queue_bind(queue=queue, exchange=topology.TOPIC_EXCHANGE,
                                           routing_key=pattern)
        finally:
            close_quietly(connection)

    def broadcast_queue(self, hostname: str) -> str:
        return topology.broadcast_queue_name(hostname)

    def join_broadcasts(self, hostname: str, queues: Iterable[str], timeout: float) -> None:
        member = topology.broadcast_queue_name(hostname)
        connection = self.connector.connect_once(timeout=timeout, name="taskq worker broadcasts")
        try:
            with bound(connection).until(time.monotonic() + timeout):
                topology.declare_work_queue(connection, member)
                channel = connection.channel()
                for queue in queues:
                    exchange = topology.broadcast_exchange(queue)
                    channel.exchange_declare(exchange, "fanout", durable=True, auto_delete=False)
                    channel.queue_bind(queue=member, exchange=exchange)
        finally:
            close_quietly(connection)

    def leave_broadcasts(self, hostname: str, timeout: float) -> None:
        connection = self.connector.connect_once(timeout=timeout, name="taskq worker broadcasts")
        try:
            with bound(connection).until(time.monotonic() + timeout):
                connection.channel().queue_delete(topology.broadcast_queue_name(hostname))
        finally:
            close_quietly(connection)

    def worker_support(self, name: str, concurrency: int) -> WorkerSupport:
        from .support import AmqpWorkerSupport

        return AmqpWorkerSupport(self, name)

    def admin(self, *, timeout: float) -> Admin:
        return QueueAdmin(self.connector, self.declared, timeout=timeout)

    def control_link(self, *, timeout: float, name: str = "taskq control") -> ControlLink:
        from .control import AmqpControl

        return AmqpControl(self, timeout, name)

    def beat_link(self, *, timeout: float) -> BeatLink:
        from .beat import AmqpBeatLink

        return AmqpBeatLink(self, timeout)

    def dead_letter_name(self, queue: str) -> str:
        return topology.dead_letter_queue_name(queue)

    def is_recoverable(self, exc: BaseException) -> bool:
        return is_recoverable(exc)

    def describe(self, exc: BaseException) -> str:
        return describe(exc)

    def explain(self, exc: BaseException) -> str | None:
        if letters.is_consumer_timeout(exc):
            return (
                "the broker closed the channel because a task held its message longer than "
                "RabbitMQ's consumer_timeout; the message goes back to the queue and will run "
                "again. Raise consumer_timeout on the broker (rabbitmq.conf) above the longest "
                "task, or split the task."
            )
        return None

    def after_fork(self) -> None:
        self.declared = set()
        self._journal_lock = None
