"""RabbitMQ's RPC tutorial (a Fibonacci server) redone as a taskq task.

The tutorial hand-writes a server with a callback queue, correlation ids and a blocking
``call()``; with taskq the server is a task and the client a ``.delay().get()``:

    taskq worker -A fib:app -c 2          # the "RPC server", in this directory
    python fib.py 30                      # the client
"""

from __future__ import annotations

import sys
import time

from taskq import App

app = App()


@app.task
def fib(n: int) -> int:
    """Deliberately the slow recursive version, so the work is CPU-bound."""
    if n < 0:
        raise ValueError(f"fib is not defined for {n}")
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def main(n: int) -> None:
    started = time.perf_counter()
    # Requests for several n at once; each result comes back to this process's reply queue
    # and is matched by its correlation id, whatever order they finish in.
    calls = {k: fib.delay(k) for k in range(n, n - 5, -1)}
    for k, result in calls.items():
        print(f"fib({k}) = {result.get(timeout=120)}")
    try:
        fib.delay(-1).get(timeout=10)
    except ValueError as exc:
        print(f"fib(-1) raised on the worker: {exc}")
    print(f"{len(calls) + 1} calls in {time.perf_counter() - started:.2f}s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 25)
