"""Fair dispatch: two workers, long and short tasks, and nobody waits behind a busy worker.

    python examples/fair_dispatch/demo.py

Starts two workers with one slot each (-c 1), sends long and short tasks interleaved, and
prints when each finished.  With prefetch 1 a busy worker holds only the task it is running,
so the short tasks flow through the free worker instead of queueing behind a long one in a
busy worker's buffer (what a larger prefetch would do: round-robin, not fair).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from jobs import app, work  # noqa: E402


def start_worker() -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "taskq", "worker", "-A", "jobs:app", "-c", "1", "-l", "WARNING"],
        cwd=HERE,
    )


def main() -> None:
    workers = [start_worker(), start_worker()]
    try:
        time.sleep(2)  # let both connect; a real deployment just starts them
        started = time.perf_counter()
        plan = [("long-1", 3.0), ("short-1", 0.1), ("long-2", 3.0)] + [
            (f"short-{i}", 0.1) for i in range(2, 9)
        ]
        results = [(label, work.delay(label, seconds)) for label, seconds in plan]
        for _, result in sorted(results, key=lambda item: item[0]):
            text = result.get(timeout=60)
            print(f"{time.perf_counter() - started:5.2f}s  {text}")
        print("Short tasks finished long before the long ones, on whichever worker was free.")
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.wait(30)
        app.close()


if __name__ == "__main__":
    main()
