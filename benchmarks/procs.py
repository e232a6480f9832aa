"""Worker subprocesses: start in their own process group, stop for sure, measure memory."""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Every worker started and not yet reaped: killed on exit, whatever happens.
_live: list[WorkerProcess] = []
#: CPU seconds used by the process trees of stopped workers (see cpu.py). Read from /proc
#: just before stopping: a worker's grandchildren are not reaped by this process, so their
#: time would never show in ``os.times()``.
_stopped_cpu_s = 0.0
_TICK = os.sysconf("SC_CLK_TCK")


class WorkerDied(RuntimeError):
    pass


class WorkerProcess:
    """A worker command run from the repo root with its output in ``log_path``."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.argv = argv
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        _live.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise WorkerDied(
                f"worker {' '.join(self.argv)} exited with {self.proc.returncode}; "
                f"last output:\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 15) -> None:
        """Warm stop (SIGTERM), then SIGKILL the whole process group."""
        global _stopped_cpu_s
        _stopped_cpu_s += tree_cpu_s(self.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        self.kill()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        if self in _live:
            _live.remove(self)


def stopped_workers_cpu_s() -> float:
    return _stopped_cpu_s


def kill_all() -> None:
    """Kill every worker this run started (used on errors and Ctrl-C)."""
    for worker in list(_live):
        worker.kill()


# -- memory of a process tree -------------------------------------------------------------------


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, from /proc/<pid>/task/*/children."""
    pids = [pid]
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        with contextlib.suppress(OSError):
            for child in Path(path).read_text().split():
                pids.extend(tree(int(child)))
    return pids


def process_cpu_s(pid: int | None, *, reaped_children: bool = False) -> float:
    """utime + stime of a live process (plus its reaped children's), in seconds."""
    if pid is None:
        return 0.0
    with contextlib.suppress(OSError, IndexError, ValueError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime, stime
        if reaped_children:
            ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
        return ticks / _TICK
    return 0.0


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a live process tree, including children it reaped."""
    return sum(process_cpu_s(p, reaped_children=True) for p in tree(pid))


def _field_kb(path: str, name: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return 0


def tree_memory(pid: int) -> dict[str, float]:
    """Sum of VmRSS (and of Pss, which counts shared pages once) over the tree, in MiB."""
    pids = tree(pid)
    rss = sum(_field_kb(f"/proc/{p}/status", "VmRSS") for p in pids)
    pss = sum(_field_kb(f"/proc/{p}/smaps_rollup", "Pss") for p in pids)
    return {"rss_mb": rss / 1024, "pss_mb": pss / 1024, "processes": len(pids)}
