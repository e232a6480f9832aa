"""CPU accounting: who spent CPU on the tasks, and how busy the machine was with other work.

Per-task CPU (client process, worker process tree, broker) is far steadier than wall-clock
rates on a busy machine, and says which side a slowdown lives on.

On a shared 2-core machine, anything else that runs (another test suite, a second broker)
moves the numbers. ``others = machine busy time - this run's processes - the broker``,
per second of wall time: 0.0 is a quiet machine, 1.0 is one core taken by someone else.
This run's processes are this one and the process trees of the workers it stopped (each
read from /proc just before it is stopped).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .procs import process_cpu_s, stopped_workers_cpu_s, tree

_TICK = os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds all cores spent running processes since boot, or stolen by the hypervisor.

    Interrupt time is left out: loopback networking of this very run lands there, not in
    any process's own time.
    """
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + steal) / _TICK


def own_s() -> float:
    times = os.times()
    return times.user + times.system + stopped_workers_cpu_s()


def broker_pid() -> int | None:
    """The RabbitMQ node's OS pid (the broker's own CPU is part of what we measure)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
        proc = subprocess.run(
            ["rabbitmqctl", "eval", "os:getpid()."],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return int(proc.stdout.strip().strip('"'))
    return None


@dataclass
class Snapshot:
    wall: float
    busy: float
    own: float
    broker: float


class CpuMeter:
    """``rabbitmq``: whether any system of the run uses it (else its node is not looked up,
    and whatever it does counts as other processes' CPU)."""

    def __init__(self, rabbitmq: bool = True) -> None:
        self.broker_pid = broker_pid() if rabbitmq else None

    def split(self, worker_pid: int, broker: bool = True) -> dict[str, float]:
        """CPU seconds so far of this process (all threads), the worker tree and (``broker``:
        the system is on RabbitMQ) the broker. An embedded system has no broker process."""
        times = os.times()
        split = {
            "client": times.user + times.system,
            "worker": sum(process_cpu_s(pid) for pid in tree(worker_pid)),
        }
        if broker:
            split["broker"] = process_cpu_s(self.broker_pid)
        return split

    def snapshot(self) -> Snapshot:
        return Snapshot(time.monotonic(), machine_busy_s(), own_s(), process_cpu_s(self.broker_pid))

    def others_cores(self, start: Snapshot) -> float:
        """Cores used by other processes, on average, since ``start``."""
        end = self.snapshot()
        wall = end.wall - start.wall
        if wall <= 0:
            return 0.0
        others = (end.busy - start.busy) - (end.own - start.own) - (end.broker - start.broker)
        return max(0.0, others / wall)
