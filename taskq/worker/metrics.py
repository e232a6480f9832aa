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
        self._started: dict[str, str] = {}
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
        task = str(report.get("name") or "?")
        if kind == "task-started":
            self._started[task_id] = queue
            self.running.labels(queue).inc()
            return
        outcome = FINISHED.get(str(kind))
        if outcome is None:
            return
        if self._started.pop(task_id, None) is not None:
            self.running.labels(queue).dec()
        self.tasks.labels(task, queue, outcome).inc()
        runtime = report.get("runtime")
        if isinstance(runtime, (int, float)):
            self.duration.labels(task, queue).observe(runtime)
        if outcome == "retried":
            self.retries.labels(task, queue).inc()
        elif outcome in ("rejected", "revoked"):
            self.dead.labels(task, queue, outcome).inc()

    def _depths(self) -> None:
        admin = None
        while not self._stop.wait(0 if admin is None else DEPTH_EVERY):
            if self._monitor is not None:
                self.reconnects.set(self._monitor.worker_reconnects())
                queues = list(self._monitor.queues)
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
