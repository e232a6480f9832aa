"""The quickstart end to end: start a worker, run the producer, stop the worker gracefully.

    python examples/quickstart/run.py

Nothing to install or start: the tasks use the embedded broker (./taskq.db beside them) unless
$TASKQ_BROKER_URL names another, e.g. amqp://guest:guest@localhost:5672// for RabbitMQ.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    worker = subprocess.Popen(
        [sys.executable, "-m", "taskq", "worker", "-A", "tasks:app", "-c", "2"], cwd=HERE
    )
    try:
        time.sleep(0.5)
        if worker.poll() is not None:
            print("the worker did not start (see its error above)", file=sys.stderr)
            return 1
        producer = subprocess.run([sys.executable, "producer.py"], cwd=HERE, timeout=120)
        return producer.returncode
    finally:
        worker.send_signal(signal.SIGTERM)  # warm shutdown: finish, ack, exit 0
        worker.wait(30)


if __name__ == "__main__":
    sys.exit(main())
