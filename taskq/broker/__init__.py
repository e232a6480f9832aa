"""Everything broker-specific lives below this package; the rest of taskq sees this surface.

* ``client_connection()``: confirmed, ``mandatory`` publishing, and (on one connection per
  process) the reply queue; used by one thread at a time;
* ``slot_connection()``: a worker slot's connection (prefetch 1, manual acks, dead letters).

RabbitMQ is the production broker (:mod:`taskq.broker.amqp`).
"""

from __future__ import annotations

from ..config import Config
from .amqp import AmqpBroker

Broker = AmqpBroker


def broker_for(config: Config) -> Broker:
    return AmqpBroker(config)
