"""The floor: a bare py-amqp RPC echo keeping the same contract with nothing else around it.

Worker (``python -m benchmarks.floor URL QUEUE -c 2``): N processes, one connection each,
prefetch 1, manual acks; each runs ``add``, publishes the reply to ``reply_to`` with the
``correlation_id``, then acks. Client: confirmed, persistent publishes to the durable queue
and one exclusive, auto-delete reply queue. No task protocol, no registry, no retries: the
least any Python task queue can cost on this broker.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing
import signal
import time
from typing import Any

import amqp

from .broker import connect


def declare_work_queue(channel: Any, queue: str) -> None:
    channel.queue_declare(queue, durable=True, auto_delete=False)


# -- worker -------------------------------------------------------------------------------------


def serve(url: str, queue: str) -> None:
    """One worker slot: consume with prefetch 1, reply, ack."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = connect(url)
    channel = conn.channel()
    declare_work_queue(channel, queue)
    channel.basic_qos(0, 1, False)

    def on_message(message: amqp.Message) -> None:
        x, y = json.loads(message.body)
        props = message.properties
        reply = amqp.Message(json.dumps(x + y), correlation_id=props["correlation_id"])
        channel.basic_publish(reply, exchange="", routing_key=props["reply_to"])
        channel.basic_ack(message.delivery_info["delivery_tag"])

    channel.basic_consume(queue, no_ack=False, callback=on_message)
    while True:
        conn.drain_events()


def worker_main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("queue")
    parser.add_argument("-c", "--concurrency", type=int, default=2)
    args = parser.parse_args()
    ctx = multiprocessing.get_context("fork")
    slots = [
        ctx.Process(target=serve, args=(args.url, args.queue), daemon=True)
        for _ in range(args.concurrency)
    ]
    for slot in slots:
        slot.start()
    stop = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # after forking: the slots keep defaults
    signal.sigwait(stop)
    for slot in slots:
        slot.terminate()
        slot.join(5)


# -- client -------------------------------------------------------------------------------------


class FloorResult:
    def __init__(self, client: FloorClient, correlation_id: str) -> None:
        self.client = client
        self.id = correlation_id

    def get(self, timeout: float | None = None) -> Any:
        return self.client.wait_result(self.id, timeout)


class FloorClient:
    """One connection: a confirm-mode publishing channel and a reply-queue consumer."""

    def __init__(self, url: str, queue: str) -> None:
        self.queue = queue
        self.conn = connect(url)
        self.publisher = self.conn.channel()
        declare_work_queue(self.publisher, queue)
        self.publisher.confirm_select()
        self.publisher.events["basic_ack"].add(self._on_ack)
        self.publisher.events["basic_nack"].add(self._on_nack)
        self.confirmed = 0  # highest sequence number the broker confirmed (it acks in order)
        self.sent = 0
        replies = self.conn.channel()
        self.reply_queue = replies.queue_declare("", exclusive=True, auto_delete=True).queue
        replies.basic_consume(self.reply_queue, no_ack=True, callback=self._on_reply)
        self.results: dict[str, Any] = {}
        self._ids = itertools.count()

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self.confirmed = max(self.confirmed, tag)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        raise RuntimeError(f"broker nacked message {tag}")

    def _on_reply(self, message: amqp.Message) -> None:
        self.results[message.properties["correlation_id"]] = json.loads(message.body)

    def _publish(self, x: int, y: int) -> FloorResult:
        correlation_id = f"floor-{next(self._ids)}"
        message = amqp.Message(
            json.dumps([x, y]),
            delivery_mode=2,
            content_type="application/json",
            correlation_id=correlation_id,
            reply_to=self.reply_queue,
        )
        self.publisher.basic_publish(message, exchange="", routing_key=self.queue)
        self.sent += 1
        return FloorResult(self, correlation_id)

    def _wait_confirms(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.confirmed < self.sent:
            self.conn.drain_events(timeout=max(0.001, deadline - time.monotonic()))

    def delay(self, x: int, y: int) -> FloorResult:
        """Publish and return once the broker confirmed it."""
        result = self._publish(x, y)
        self._wait_confirms()
        return result

    def delay_many(self, arg_tuples: list[tuple[int, int]]) -> list[FloorResult]:
        """Publish all, then wait for all confirms (pipelined)."""
        results = [self._publish(x, y) for x, y in arg_tuples]
        self._wait_confirms()
        return results

    def wait_result(self, correlation_id: str, timeout: float | None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while correlation_id not in self.results:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"no reply for {correlation_id} within {timeout}s")
            self.conn.drain_events(timeout=remaining)
        return self.results.pop(correlation_id)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()


if __name__ == "__main__":
    worker_main()
