"""Chaos run: ``python benchmarks/chaos.py [--tasks 3000 --workers 2 --slots 2 --seconds 120]``.

Boots a throwaway RabbitMQ node of its own (the machine's main broker is not touched), starts
real workers, sends the tasks while slots, workers and the broker are SIGKILLed at random every
2-4 s, then checks that every confirmed task ran and every caller got its correct result.

By default all tasks are sent at once and each sleeps long enough (``--task-ms``, derived from
``--load``) that the slots have a backlog for about half of the chaos: a broker crash with
nothing queued tests little.  ``--task-ms 20 --bursts 40`` is a light, fast-task variant.

The harness is ``tests/chaos.py`` (the same one ``tests/test_chaos.py`` runs, shorter); this file
only parses arguments.  Exit status 0 if the report found no problem, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.chaos import ChaosSettings, run_chaos
from tests.rabbit_node import amqp_node


def _no_node(reason: str) -> NoReturn:
    raise SystemExit(f"cannot run a RabbitMQ node here: {reason}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=120.0, help="about how long the chaos "
                        "lasts (the kill plan is made to fit)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--bursts", type=int, default=1, help="send the tasks in this many "
                        "bursts spread over 3/4 of the chaos (default: all at once)")
    parser.add_argument("--task-ms", type=float, default=None, help="each run sleeps 0..N ms "
                        "(default: so that the pure work is about --load of the chaos time)")
    parser.add_argument("--load", type=float, default=0.5)
    parser.add_argument("--min-broker-kills", type=int, default=3)
    parser.add_argument("--keep", metavar="DIR", type=Path, default=None,
                        help="keep worker logs, the effects file and the node's logs here")
    args = parser.parse_args(argv)
    settings = ChaosSettings(
        tasks=args.tasks, workers=args.workers, slots=args.slots, chaos_seconds=args.seconds,
        seed=args.seed, bursts=args.bursts, task_ms=args.task_ms, load=args.load,
        at_least={"broker": args.min_broker_kills, "worker": 1, "slot": 1},
        result_timeout=max(120.0, args.tasks * 0.05),
    )
    work = args.keep or Path(tempfile.mkdtemp(prefix="taskq-chaos-"))
    with amqp_node(on_unavailable=_no_node, logs_to=work / "node-logs") as node:
        print(f"node {node.name} booted in {node.start_seconds:.1f}s; files in {work}")
        report = run_chaos(node, settings, work)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
