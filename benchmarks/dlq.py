"""``taskq dlq`` on a large dead-letter queue: time and peak memory of list, show and replay.

    python benchmarks/dlq.py [--letters 100000] [--body 200] [--broker amqp://...]

Fills ``<queue>.dlq`` with LETTERS dead letters (each a protocol-v2 task message with the
headers a worker writes), then runs the real CLI in a child process for each command and
reports wall time and the child's peak RSS (``ru_maxrss``), beside the RSS of a CLI that only
prints its version (the interpreter and imports). Bounded memory means the figures for list,
show (which reads every letter to find the last) and replay --all do not grow with LETTERS.
On RabbitMQ it uses a vhost of its own, deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.broker import connect, rabbitmqctl  # noqa: E402


def fill(url: str, queue: str, letters: int, body_size: int) -> list[str]:
    """Publish the dead letters (pipelined confirms, in windows) and return their ids."""
    conn = connect(url)
    channel = conn.channel()
    channel.confirm_select()
    channel.queue_declare(f"{queue}.dlq", durable=True, auto_delete=False)
    import amqp

    ids = []
    padding = "x" * body_size
    for _ in range(letters):
        task_id = str(uuid.uuid4())
        ids.append(task_id)
        headers = {
            "lang": "py", "task": "bench.lost", "id": task_id,
            "x-taskq-dead-reason": "no task named 'bench.lost' is registered with this worker",
            "x-taskq-dead-exception": "NotRegistered",
            "x-taskq-dead-at": "2026-12-02T00:00:00+00:00",
            "x-taskq-original-queue": queue, "x-taskq-dead-worker": "bench@host",
        }
        message = amqp.Message(json.dumps([[padding], {}, {}]).encode(),
                               content_type="application/json", correlation_id=task_id,
                               delivery_mode=2, application_headers=headers)
        channel.basic_publish(message, exchange="", routing_key=f"{queue}.dlq")
    conn.close()
    return ids


def run(command: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(seconds, peak RSS of that child in MiB, last line of its output)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "taskq", *command], env=env, cwd=ROOT,
                                stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"taskq {' '.join(command)} failed: {err.read()[-500:]}")
        lines = out.read().strip().splitlines() or [""]
    return seconds, usage.ru_maxrss / 1024, lines[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--letters", type=int, default=100_000)
    parser.add_argument("--body", type=int, default=200, help="bytes of argument per letter")
    parser.add_argument("--broker", default=None, help="default: a new vhost on the local "
                        "RabbitMQ")
    args = parser.parse_args()
    vhost = None
    url = args.broker
    if url is None:
        vhost = f"bench-dlq-{uuid.uuid4().hex[:8]}"
        rabbitmqctl("add_vhost", vhost)
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        url = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    queue = "bench"
    env = {**os.environ, "TASKQ_BROKER_URL": url}
    try:
        started = time.perf_counter()
        ids = fill(url, queue, args.letters, args.body)
        print(f"filled {queue}.dlq with {args.letters:,} letters in "
              f"{time.perf_counter() - started:.1f}s")
        rows = [("version (baseline)", run(["--version"], env))]
        rows.append(("dlq list --limit 50", run(["dlq", "list", queue, "--limit", "50"], env)))
        rows.append((f"dlq show <the last of {args.letters:,}>",
                     run(["dlq", "show", ids[-1], "-Q", queue], env)))
        rows.append(("dlq replay --all", run(["dlq", "replay", queue, "--all"], env)))
        print(f"{'command':40} {'seconds':>8} {'peak RSS (MiB)':>15}")
        for name, (seconds, rss, _) in rows:
            print(f"{name:40} {seconds:8.1f} {rss:15.1f}")
        print(f"replay: {rows[-1][1][2]}")
    finally:
        if vhost is not None:
            rabbitmqctl("delete_vhost", vhost)
    return 0


if __name__ == "__main__":
    sys.exit(main())
