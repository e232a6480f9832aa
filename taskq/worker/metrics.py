"""``taskq worker --metrics-port PORT``: Prometheus metrics, served by the supervisor.

Made from the slots' reports (see :mod:`.reports`), so the slots pay one line on a local socket per
step of a task and nothing else; needs ``prometheus_client`` (``pip install 'taskq[metrics]'``).
Queue depths are read from the broker every :data:`DEPTH_EVERY` seconds by a thread of its
own. Metrics (all prefixed ``taskq_``):

* ``tasks_total{task,queue,outcome}``: runs finished (succeeded, failed, retried, rejected,
  revoked);
* ``task_duration_seconds{task,queue}``: a histogram of run times;
* ``tasks_running{queue}``: tasks running now;
* ``task_retries_total{task,queue}``, ``dead_letters_total{task,queue,reason}``;
* ``broker_reconnects_total``: slot links lost and made again;
* ``queue_ready_messages{queue}``, ``queue_unacked_messages{queue}``,
  ``queue_dead_letters{queue}``: where the broker tells them.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from ..app import App
from ..errors import ConfigurationError

if TYPE_CHECKING:
    from .monitor import Monitor

log = logging.getLogger("taskq.worker")

DEPTH_EVERY = 5.0
#: Run-time buckets (seconds): from a millisecond task to a long batch job.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
           30.0, 60.0, 300.0, float("inf"))
FINISHED = {"task-succeeded": "succeeded", "task-failed": "failed", "task-retried": "retried",
            "task-rejected": "rejected", "task-revoked": "revoked"}


class Metrics:
    def __init__(self, app: App, port: int) -> None:
        try:
            import prometheus_client as prom
        except ImportError:
            raise ConfigurationError(
                "--metrics-port needs prometheus_client: pip install 'taskq[metrics]'"
            ) from None
        self.app = app
        self.port = port
        self.prom = prom
        self.registry = registry = prom.CollectorRegistry()
        self.tasks = prom.Counter("taskq_tasks", "Task runs finished, by outcome",
                                  ["task", "queue", "outcome"], registry=registry)
        self.duration = prom.Histogram("taskq_task_duration_seconds", "Task run time",
                                       ["task", "queue"], buckets=BUCKETS, registry=registry)
        self.running = prom.Gauge("taskq_tasks_running", "Tasks running now", ["queue"],
                                  registry=registry)
        self.retries = prom.Counter("taskq_task_retries", "Task runs that asked to retry",
                                    ["task", "queue"], registry=registry)
        self.dead = prom.Counter("taskq_dead_letters", "Messages this worker dead-lettered",
                                 ["task", "queue", "reason"], registry=registry)
        self.reconnects = prom.Gauge("taskq_broker_reconnects_total",
                                     "Slot broker links lost and made again",
                                     registry=registry)
        self.ready = prom.Gauge("taskq_queue_ready_messages", "Messages ready in the queue",
                                ["queue"], registry=registry)
        self.unacked = prom.Gauge("taskq_queue_unacked_messages",
                                  "Messages taken by a worker, not yet acked", ["queue"],
                                  registry=registry)
        self.dead_depth = prom.Gauge("taskq_queue_dead_letters", "Dead letters of the queue",
                                     ["queue"], registry=registry)
        #: The runs started and not finished: task id -> [queue, task, depth checks that
        #: found no slot running it, slot pid]. A run whose slot died is counted lost at the
        #: second such check, or when the task starts again in another slot.
        self._started: dict[str, list[Any]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: Any = None
        self._monitor: Monitor | None = None

    def start(self, monitor: Monitor) -> None:
        self._monitor = monitor
        try:
            served = self.prom.start_http_server(self.port, registry=self.registry)
        except OSError as exc:
            raise ConfigurationError(
                f"--metrics-port {self.port}: can't listen there ({exc.strerror or exc})"
            ) from None
        self._server = served[0] if isinstance(served, tuple) else None
        if self._server is not None:
            self.port = int(self._server.server_port)  # the one the system chose for 0
        log.info("metrics: http://0.0.0.0:%d/metrics", self.port)
        threading.Thread(target=self._depths, name="taskq-metrics", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def observe(self, report: dict[str, Any]) -> None:
        """A slot's report (from the monitor's thread)."""
        kind = report.get("type")
        task_id = str(report.get("uuid"))
        queue = str(report.get("queue") or "")
        # a label per task the app knows (a message may name anything: one series each)
        task = str(report.get("name") or "")
        task = task if task in self.app.tasks else "unknown"
        if kind == "task-started":
            with self._lock:
                earlier = self._started.get(task_id)
                self._started[task_id] = [queue, task, 0, report.get("slot_pid")]
            if earlier is not None and earlier[3] != report.get("slot_pid"):
                self._count_lost([earlier])  # it runs again: the slot of its last run died
            self.running.labels(queue).inc()
            return
        outcome = FINISHED.get(str(kind))
        if outcome is None:
            return
        with self._lock:
            started = self._started.pop(task_id, None)
        if started is not None:
            self.running.labels(queue).dec()
        self.tasks.labels(task, queue, outcome).inc()
        runtime = report.get("runtime")
        if isinstance(runtime, (int, float)):
            self.duration.labels(task, queue).observe(runtime)
        if outcome == "retried":
            self.retries.labels(task, queue).inc()
        elif outcome in ("rejected", "revoked"):
            self.dead.labels(task, queue, _reason(report, outcome)).inc()

    def _lost(self, running: set[str]) -> None:
        """Runs started that no slot runs any more, at two depth checks in a row, and never
        told their end: their slot died (kill -9, OOM). Counted as lost."""
        with self._lock:
            gone = []
            for task_id, seen in self._started.items():
                if task_id in running:
                    seen[2] = 0
                    continue
                seen[2] += 1
                if seen[2] >= 2:
                    gone.append(task_id)
            ended = [(self._started.pop(task_id)) for task_id in gone]
        self._count_lost(ended)

    def _count_lost(self, runs: list[list[Any]]) -> None:
        for queue, task, *_ in runs:
            self.running.labels(queue).dec()
            self.tasks.labels(task, queue, "lost").inc()

    def _depths(self) -> None:
        admin = None
        while not self._stop.wait(0 if admin is None else DEPTH_EVERY):
            if self._monitor is not None:
                self.reconnects.set(self._monitor.worker_reconnects())
                queues = list(self._monitor.queues)
                self._lost({str(task["id"]) for task in self._monitor.active()})
            try:
                if admin is None:
                    admin = self.app.broker.admin(timeout=self.app.config.connect_timeout)
                for stats in admin.queue_stats(queues):
                    self.ready.labels(stats.name).set(stats.ready)
                    if stats.unacked is not None:
                        self.unacked.labels(stats.name).set(stats.unacked)
                    if stats.dead is not None:
                        self.dead_depth.labels(stats.name).set(stats.dead)
            except Exception as exc:
                log.debug("metrics: queue depths unavailable: %s", exc)
                if admin is not None:
                    admin.close()
                admin = None
                self._stop.wait(DEPTH_EVERY)


def _reason(report: dict[str, Any], outcome: str) -> str:
    """A dead letter's reason as a label: ``revoked``, or the exception's type."""
    if outcome == "revoked":
        return "revoked"
    text = str(report.get("exception") or "")
    kind = text.split(":", 1)[0].split("(", 1)[0].strip()
    return kind[:40] if kind.isidentifier() else "other"
