"""One execution slot: one broker link, and the tasks it receives run right here.

The slot's thread waits (``poll``) on its link and a wake-up pipe, takes one message at a time,
runs the task in this same thread, sends the result and lets the message go. No hand-off to
another thread or process: on a busy machine every extra wake-up costs more than the task
itself, and this is what keeps a round trip close to the broker's own floor.

* While a task runs, :mod:`taskq.worker.heartbeat` keeps the link alive.
* A task with a hard ``time_limit`` runs in an executor child process instead
  (:mod:`taskq.worker.executor`), which the slot kills and replaces if the limit passes; the
  slot waits on it together with its link, so the link stays alive meanwhile.
* A message is settled only after its result is sent; one that can't run is dead-lettered
  (stored first) and then settled. The link holds one message at most, so a slot never holds
  a message it is not running.
* If the process running a task dies, the broker gives the message to another slot and counts
  the lost run; after ``delivery_limit`` lost runs the message is dead-lettered as poison.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import time
from collections import OrderedDict, deque
from typing import Any, Protocol

from ..app import App
from ..broker.base import NOTHING_AFTER, After, Reply, SlotLink
from ..broker.records import RunRecord
from ..copies import delayed, retry
from ..errors import (
    DeclarationConflict,
    TaskRevoked,
    TimeLimitExceeded,
    Unroutable,
    WorkerLostError,
)
from ..message import Delivery, bounded_repr, parse_full_body
from ..rates import Pacer
from ..task import Task
from . import flow
from .execute import Job, Outcome, answerer, execute, failure_outcome
from .executor import ProcessExecutor, forkserver_context
from .reports import Watch
from .triage import Later, Refuse, SlotOptions, reply_to, triage

log = logging.getLogger("taskq.worker")

#: Runs remembered as finished although their link died before they were settled.
REMEMBERED = 1024
#: With ``--burst``, how long an idle slot waits for a message before it asks the broker
#: whether its queues are empty (seconds).
BURST_LOOK = 0.05

_POLLIN = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR


class Reporter(Protocol):
    """Where a slot reports what its supervisor should know (and log once, not per slot)."""

    def connection_lost(self, slot: str, reason: str, opened_at: float | None = None) -> None: ...
    def connection_restored(self, slot: str) -> None: ...
    def holding(self, slot: str, handle: int | None) -> None: ...


class Slot:
    def __init__(
        self,
        app: App,
        options: SlotOptions,
        index: int,
        reporter: Reporter,
        *,
        record: RunRecord,
        state: dict[str, str] | None = None,
        main_thread: bool,
    ) -> None:
        self.name = f"slot-{index}"
        self.index = index
        self.app = app
        self.options = options
        self.reporter = reporter
        #: What this slot runs, for its supervisor (and the broker, if this process dies).
        self.record = record
        self.state = state or {}
        self.config = app.config
        self.broker = app.broker
        #: Soft time limits use SIGALRM, which only the main thread receives.
        self.main_thread = main_thread
        self.link: SlotLink | None = None
        self.consuming = False
        self.inbox: deque[Delivery] = deque()
        self.executor: ProcessExecutor | None = None
        self.current: Delivery | None = None
        self.current_link: SlotLink | None = None
        self.started_at = 0.0
        self.hard_limit: float | None = None
        #: When the task running in this thread started (None: none is), for keepalives.
        self.running_since: float | None = None
        self.stashed: list[tuple[Delivery, Reply]] = []
        #: (task id, retries) of runs that finished after their link died: the broker gives
        #: the message back (to us, usually), and running it again would only repeat it.
        #: What each must still store when it is settled (a workflow's next message).
        self.finished_unsettled: OrderedDict[tuple[str, Any], After | None] = OrderedDict()
        self.stopping = False
        #: The slot retired between tasks to be replaced (``--max-tasks-per-child``, ...).
        self.recycle = False
        self.tasks_run = 0
        self.pacer = Pacer()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._executor_changed = False
        #: What the worker's monitor wants to hear, and which tasks are revoked.
        self.watch = Watch(options.monitor_socket, index)
        self.reporting = False  # whether the run under way is told (see _running)

    # -- control -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Warm stop: take no more messages, finish the current one, then return."""
        self.stopping = True
        self.wake()

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def kill_current(self) -> None:
        """Cold stop of a task running in the executor (an inline one dies with the process)."""
        if self.executor is not None:
            self.executor.kill()

    @property
    def keepalive_interval(self) -> float:
        link = self.link
        return link.tick_interval if link is not None else 0.0

    def keepalive_if_busy(self, quiet_for: float) -> None:
        """Called by the keepalive thread: keep the link alive if a task keeps us busy."""
        since, link = self.running_since, self.current_link
        if (
            since is not None
            and link is not None
            and link is self.link
            and (time.monotonic() - since >= quiet_for)
        ):
            link.keepalive()

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until stopped. Raises what can't be recovered from (e.g. a queue conflict)."""
        try:
            while not (self.stopping and self.current is None):
                if self.link is None:
                    self._connect()
                    continue
                try:
                    self._serve(self.link)
                except DeclarationConflict:
                    raise
                except Exception as exc:
                    self._connection_lost(exc)
        finally:
            self._close()

    def _close(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None
        if self.executor is not None:
            self.executor.close()
            self.executor = None
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.watch.close()

    def _connect(self) -> None:
        delay = 0.1
        while self.link is None and not (self.stopping and self.current is None):
            try:
                self.link = self.broker.slot_link(
                    self.options.consumed,
                    self.inbox.append,
                    timeout=self.config.connect_timeout,
                    name=f"taskq worker {self.name}",
                    state=self.state,
                )
            except DeclarationConflict:
                raise
            except Exception as exc:
                if not self.broker.is_recoverable(exc):
                    raise
                self.reporter.connection_lost(self.name, self.broker.describe(exc))
                self._wait_without_broker(delay)
                delay = min(delay * 2, 5.0)
        if self.link is not None:
            self.reporter.holding(self.name, self.link.hold_handle())
            self.reporter.connection_restored(self.name)

    def _connection_lost(self, exc: BaseException) -> None:
        opened_at = None
        if self.link is not None:
            opened_at = self.link.opened_at
            self.link.drop()
            self.link = None
        self.consuming = False
        self.inbox.clear()  # what a dead link held returns to the queue
        hint = self.broker.explain(exc)
        if hint:
            log.error("%s: %s", self.name, hint)
        elif not self.broker.is_recoverable(exc):
            log.error("%s: unexpected error, reconnecting: %r", self.name, exc, exc_info=exc)
        self.reporter.connection_lost(self.name, self.broker.describe(exc), opened_at)

    def _wait_without_broker(self, timeout: float) -> None:
        """While reconnecting, keep watching the executor (its results are stashed)."""
        poller = select.poll()
        poller.register(self._wake_r, _POLLIN)
        if self.executor is not None:
            poller.register(self.executor.fileno(), _POLLIN)
        for fd, _ in poller.poll(self._timeout_ms(timeout)):
            if fd == self._wake_r:
                self._drain_wake()
            elif self.executor is not None:
                self._finish(self.executor.collect())
        self._check_time_limit()

    def _serve(self, link: SlotLink) -> None:
        self._flush_stash(link)
        poller = select.poll()
        link_fd = link.input.fileno()
        poller.register(link_fd, _POLLIN)
        poller.register(self._wake_r, _POLLIN)
        exec_fd = -1
        self._executor_changed = self.executor is not None
        tick = link.tick_interval
        next_tick = time.monotonic() + tick
        while self._keep_serving(link):
            if self._executor_changed:
                self._executor_changed = False
                if exec_fd >= 0:
                    poller.unregister(exec_fd)
                exec_fd = self.executor.fileno() if self.executor is not None else -1
                if exec_fd >= 0:
                    poller.register(exec_fd, _POLLIN)
            ready = self._ready(link, poller, next_tick)
            for fd in ready:
                if fd == link_fd:
                    link.drain()
                elif fd == exec_fd and self.executor is not None:
                    if not self._executor_changed:
                        self._finish(self.executor.collect())
                else:
                    self._drain_wake()
            if self.current is None and self.inbox:
                self._start(self.inbox.popleft())
            elif not ready and self.options.burst:
                self._stop_if_drained(link)
            self._check_time_limit()
            now = time.monotonic()
            if now >= next_tick:
                link.tick()
                self.watch.flush()
                next_tick = now + tick

    def _ready(self, link: SlotLink, poller: Any, next_tick: float) -> list[int]:
        """The descriptors to handle now: waits until one is ready, the link wants a look
        (a delayed message falls due), or the next tick."""
        link_fd = link.input.fileno()
        if link.input.buffered():
            return [link_fd]
        if self.inbox and self.current is None:  # a link may hand over the next at once
            return [fd for fd, _ in poller.poll(0)]
        wait = next_tick - time.monotonic()
        if self.options.burst and self.current is None:
            wait = min(wait, BURST_LOOK)
        wakeup = link.next_wakeup()
        if wakeup is not None and wakeup < wait:
            ready = [fd for fd, _ in poller.poll(self._timeout_ms(wakeup))]
            return ready or [link_fd]
        return [fd for fd, _ in poller.poll(self._timeout_ms(wait))]

    def _keep_serving(self, link: SlotLink) -> bool:
        """Start consuming (once, when idle); pause when stopping. False once stopped with
        nothing in hand."""
        if self.stopping:
            if self.consuming:
                link.pause()
                self.consuming = False
            return self.current is not None or bool(self.inbox)
        if not self.consuming and self.current is None:
            link.start()
            self.consuming = True
        return True

    def _stop_if_drained(self, link: SlotLink) -> None:
        """``--burst``: an idle slot stops once its queues have nothing ready. It stops
        taking messages first and looks again, so that one that crossed the pause is run."""
        if self.current is not None or self.inbox or self.stopping or link.ready_now():
            return
        link.pause()
        self.consuming = False
        if self.inbox or link.ready_now():
            return  # run it; _keep_serving starts taking messages again afterwards
        log.info("%s: no message ready in %s (--burst): stopping", self.name,
                 ", ".join(self.options.queues))
        self.stopping = True

    def _retire_if_due(self) -> None:
        """Between tasks: retire the slot process to be replaced when it ran its
        ``--max-tasks-per-child`` or grew past ``--max-memory-per-child``."""
        options = self.options
        reason = ""
        if options.max_tasks_per_child and self.tasks_run >= options.max_tasks_per_child:
            reason = f"it ran {self.tasks_run} tasks (--max-tasks-per-child)"
        elif options.max_memory_per_child:
            rss = resident_mib()
            if rss > options.max_memory_per_child:
                reason = (f"its RSS is {rss:.1f} MiB, over --max-memory-per-child "
                          f"{options.max_memory_per_child:g}")
        if reason and not self.stopping:
            log.info("%s (pid %d): replacing the slot process: %s", self.name, os.getpid(),
                     reason)
            self.recycle = True
            self.stop()

    def _timeout_ms(self, seconds: float) -> int:
        if self.hard_limit is not None:
            seconds = min(seconds, self.started_at + self.hard_limit - time.monotonic())
        return max(0, int(seconds * 1000) + 1)

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._wake_r, 64):
                pass

    # -- a message arrives --------------------------------------------------------------------

    def _start(self, delivery: Delivery) -> None:
        assert self.link is not None
        if _run_key(delivery) in self.finished_unsettled:
            after = self.finished_unsettled.pop(_run_key(delivery))
            log.warning(
                "task %s[%s] came back after it finished here on a connection that was lost "
                "before its ack: settled without running it again",
                delivery.task_name,
                delivery.task_id,
            )
            self.link.settle(delivery, None, after or NOTHING_AFTER)
            return
        if self.link.is_copy(delivery):
            log.warning(
                "task %s[%s] is a second copy of a workflow's message (stored again by a rerun "
                "of the task that sent it) whose first copy ran: let go without running it",
                delivery.task_name,
                delivery.task_id,
            )
            self.link.settle(delivery, None)
            return
        if self.watch.is_revoked(delivery.task_id):
            self._revoked(delivery)
            return
        lost = self.link.lost_runs(delivery)
        decision = triage(delivery, self.app, self.options, self.name, lost)
        if isinstance(decision, Refuse):
            self._reject(delivery, decision.error)
        elif isinstance(decision, Later):
            self._later(delivery, decision.seconds)
        elif self._held_back(delivery, decision.task):
            pass
        elif decision.hard_limit:
            self._submit(delivery, decision.job, decision.hard_limit)
        else:
            self._run_here(delivery, decision.job)

    def _held_back(self, delivery: Delivery, task: Task[Any, Any]) -> bool:
        """A rate-limited task that may not start yet goes back to the broker until the
        next free interval (see :mod:`taskq.rates`); the slot takes other work."""
        interval = task.rate_interval
        if interval is None:
            return False
        key = task.name
        if task.options.rate_limit_scope == "worker":
            key = f"{task.name}@{self.options.hostname}"
        assert self.link is not None
        if self.link.admit(key, interval):
            return False
        wait = self.pacer.later(key, interval)
        self.link.forward(delivery, delayed(delivery, wait), None)
        log.debug("task %s[%s] is rate limited (%s): back to the broker for %.3fs",
                  delivery.task_name, delivery.task_id, task.options.rate_limit, wait)
        return True

    def _running(self, delivery: Delivery, job: Job) -> Job:
        assert self.link is not None
        self.current, self.current_link = delivery, self.link
        self.record.write(f"{job.task}[{job.task_id}]", self.link.run_record(delivery),
                          _arguments_text(delivery))
        #: Whether this run is told (every step or none: watching may change meanwhile).
        self.reporting = self.watch.watching
        if not self.reporting:
            return job
        self._report_start(delivery, job)
        return job._replace(report=True)

    def _report_start(self, delivery: Delivery, job: Job) -> None:
        size = len(delivery.body)
        if size > REPORTED_BODY:  # not decoded twice just to be told
            shown: dict[str, Any] = {"args": f"<{size:,} bytes>", "kwargs": ""}
        else:
            try:
                args, kwargs, _ = parse_full_body(delivery, job.accept)
            except Exception:
                args, kwargs = [], {}
            shown = {"args": bounded_repr(args), "kwargs": bounded_repr(kwargs)}
            if size <= SMALL_ARGUMENTS:
                shown.update(_small_values(args, kwargs))
        headers = job.headers
        self.watch.report("task-received", {
            "uuid": job.task_id, "name": job.task, **shown,
            "root_id": headers.get("root_id") or job.task_id,
            "parent_id": headers.get("parent_id"), "retries": headers.get("retries") or 0,
            "eta": headers.get("eta"), "expires": headers.get("expires"),
            "queue": delivery.queue, "exchange": delivery.exchange,
            "routing_key": delivery.routing_key or delivery.queue,
            "started": True})  # the monitor tells task-started from it too: one report

    def _account(self, delivery: Delivery, outcome: Outcome | None,
                 reported: bool | None = None) -> None:
        """Count what came of a run, and report it if its start was (``reported``; None: a
        message refused before it ran, told if someone watches now)."""
        if outcome is None:
            kind, event = "lost", ""
        elif outcome.kind == "reject":
            kind, event = "rejected", "task-rejected"
        elif outcome.kind == "retry":
            kind, event = "retried", "task-retried"
        elif outcome.failed:
            kind, event = "failed", "task-failed"
        else:
            kind, event = "succeeded", "task-succeeded"
        name = delivery.task_name or "?"
        self.watch.count(delivery.task_name, delivery.queue, kind)
        if event and (self.watch.watching if reported is None else reported):
            fields = dict(outcome.report or {}) if outcome is not None else {}
            if kind == "rejected" and outcome is not None:
                fields.setdefault("exception", f"{outcome.exc_type}: {outcome.detail}")
                fields["requeue"] = False
            self.watch.report(event, {"uuid": delivery.task_id, "name": name,
                                      "queue": delivery.queue, **fields})

    def _revoked(self, delivery: Delivery) -> None:
        """A revoked task's message: dead-lettered (reason ``revoked``), never run; its
        caller gets TaskRevoked."""
        assert self.link is not None
        exc = TaskRevoked(f"task {delivery.task_name}[{delivery.task_id}] was revoked")
        outcome = failure_outcome(delivery.task_id or "", exc, kind="reject",
                                  worker=answerer(delivery.headers, self.options.hostname))
        self._dead_letter(delivery, "TaskRevoked", "revoked",
                          outcome._replace(after=self._flow_failure(delivery, exc)))
        self.watch.count(delivery.task_name, delivery.queue, "revoked")
        self.watch.report("task-revoked", {"uuid": delivery.task_id,
                                           "name": delivery.task_name, "queue": delivery.queue,
                                           "terminated": False, "signum": None,
                                           "expired": False})

    def _run_here(self, delivery: Delivery, job: Job) -> None:
        job = self._running(delivery, job)
        self.running_since = time.monotonic()
        try:
            outcome = execute(self.app, job, use_signals=self.main_thread)
        finally:
            self.running_since = None
        self._finish(outcome)

    def _submit(self, delivery: Delivery, job: Job, hard_limit: float) -> None:
        if self.executor is not None and not self.executor.process.is_alive():
            self._replace_executor()  # it died while idle, and the slot had not heard yet
        if self.executor is None:
            self.executor = self._new_executor()
        job = self._running(delivery, job)
        self.started_at = time.monotonic()
        self.hard_limit = hard_limit
        self.executor.submit(job)

    def _new_executor(self) -> ProcessExecutor:
        spec = self.options.app_spec
        executor = ProcessExecutor(
            forkserver_context(spec), spec, self.options.loglevel, f"{self.name}-limited"
        )
        executor.wait_ready(timeout=60.0)
        self._executor_changed = True
        return executor

    def _later(self, delivery: Delivery, seconds: float) -> None:
        assert self.link is not None
        self.link.forward(delivery, delayed(delivery, seconds), None)
        log.debug(
            "task %s[%s] is due in %.3fs: back to the broker until then",
            delivery.task_name,
            delivery.task_id,
            seconds,
        )

    # -- the outcome -----------------------------------------------------------------------

    def _finish(self, outcome: Outcome | None) -> None:
        delivery, link = self.current, self.current_link
        self.current = self.current_link = None
        self.hard_limit = None
        reported, self.reporting = self.reporting, False
        if delivery is None:
            self.record.clear()
            if outcome is None and self.executor is not None:
                log.warning(
                    "%s: idle executor process died (%s); a new one starts when needed",
                    self.name,
                    self.executor.describe_death(),
                )
                self._replace_executor()
            return
        self.tasks_run += 1
        self._retire_if_due()  # before settling: a retiring slot takes no next message
        try:
            if outcome is None:
                self._worker_lost(delivery, link)
            else:
                self._settle(delivery, link, outcome)
        finally:
            self.record.clear()
            self._account(delivery, outcome, reported)

    def _settle(self, delivery: Delivery, link: SlotLink | None, outcome: Outcome) -> None:
        try:
            if link is self.link and link is not None:
                if link.input.waiting():
                    link.drain()  # raises if the broker closed the link meanwhile
                if self.stopping and self.consuming:
                    # Stop taking messages before settling frees the link, or the broker
                    # hands this stopping slot one more.
                    link.pause()
                    self.consuming = False
            if self.link is None or link is not self.link:
                self._stale(delivery, outcome)
            elif outcome.kind == "done":
                try:
                    self.link.settle(delivery, self._reply(delivery, outcome),
                                     outcome.after or NOTHING_AFTER)
                except Unroutable as exc:  # a workflow's next message has nowhere to go
                    self._reject(delivery, exc, account=False)
            elif outcome.kind == "reject":
                self._dead_letter(delivery, outcome.exc_type, outcome.detail, outcome)
            else:
                self.link.forward(
                    delivery, retry(delivery, outcome.countdown), self._reply(delivery, outcome)
                )
        except Exception:
            # The link failed under us: the broker will deliver the message again; keep the
            # result to send once reconnected, so the caller need not wait for the rerun.
            self._stale(delivery, outcome, stash=True)
            raise

    @staticmethod
    def _reply(delivery: Delivery, outcome: Outcome) -> Reply | None:
        """The caller's result, if it wants one."""
        if outcome.body is None or not reply_to(delivery):
            return None
        return Reply(outcome.body, outcome.content_type)

    def _stale(self, delivery: Delivery, outcome: Outcome, *, stash: bool = False) -> None:
        """The task finished, but its message belonged to a link that has died: send the
        result on the current link, or keep it (``stash``) until there is one."""
        log.warning(
            "task %s[%s] finished after the broker connection it came on was lost: the broker "
            "will deliver it again (at-least-once); its caller gets the first result only",
            delivery.task_name,
            delivery.task_id,
        )
        if outcome.kind == "done" and delivery.task_id:
            self.finished_unsettled[_run_key(delivery)] = outcome.after
            while len(self.finished_unsettled) > REMEMBERED:
                self.finished_unsettled.popitem(last=False)
        reply = self._reply(delivery, outcome)
        if outcome.kind != "done" or reply is None:
            return
        if stash or self.link is None:
            self.stashed.append((delivery, reply))
            return
        self.link.reply(delivery, reply)

    def _flush_stash(self, link: SlotLink) -> None:
        """Send the results stashed while the broker was away (one at a time: if this link
        fails too, the rest stay stashed)."""
        while self.stashed:
            delivery, reply = self.stashed[0]
            link.reply(delivery, reply)
            del self.stashed[0]

    def _reject(self, delivery: Delivery, exc: BaseException, *, account: bool = True) -> None:
        outcome = failure_outcome(delivery.task_id or "", exc, kind="reject",
                                  worker=answerer(delivery.headers, self.options.hostname))
        self._dead_letter(delivery, type(exc).__name__, str(exc),
                          outcome._replace(after=self._flow_failure(delivery, exc)))
        if account and self.current is None:  # refused before it ran (_finish counts runs)
            self._account(delivery, outcome)

    def _flow_failure(self, delivery: Delivery, exc: BaseException) -> After | None:
        """A workflow's message that fails outside its task (rejected, stopped at its time
        limit): tell the callers waiting on the rest of the workflow."""
        embed = flow.embed_of(delivery, self.config.accept)
        if not flow.is_flow(embed):
            return None
        return flow.after_failure(self.app, embed, delivery.headers, delivery.task_name or "?",
                                  delivery.task_id or "?", exc, None)

    def _dead_letter(
        self, delivery: Delivery, exc_type: str, reason: str, outcome: Outcome
    ) -> None:
        assert self.link is not None
        if outcome.after is not None:
            for notice in outcome.after.replies:
                self.link.reply(delivery, notice)
        where = self.link.dead_letter(
            delivery, exc_type, reason, self.options.hostname, self._reply(delivery, outcome)
        )
        log.error(
            "task %s[%s] moved to dead letters %s: %s: %s",
            delivery.task_name,
            delivery.task_id,
            where,
            exc_type,
            reason,
        )

    # -- deaths and time limits -------------------------------------------------------------

    def _worker_lost(self, delivery: Delivery, link: SlotLink | None) -> None:
        assert self.executor is not None
        death = self.executor.describe_death()
        log.error(
            "%s: the process running task %s[%s] died (%s)",
            self.name,
            delivery.task_name,
            delivery.task_id,
            death,
        )
        self._replace_executor()
        if self.link is None or link is not self.link:
            return  # the broker returns it with the dead link
        count = self.link.lost_runs(delivery) + 1
        limit = self.config.delivery_limit
        if count >= limit:
            self._reject(
                delivery,
                WorkerLostError(
                    f"task {delivery.task_name}[{delivery.task_id}] was attempted {count} times "
                    f"and the process running it died every time ({death}); dead-lettered as "
                    f"a poison message (delivery_limit={limit})"
                ),
            )
            return
        self.link.requeue_lost(delivery)
        log.warning(
            "task %s[%s]: the process running it died (%s); back in its queue (attempt %d "
            "of at most %d)",
            delivery.task_name,
            delivery.task_id,
            death,
            count + 1,
            limit,
        )

    def _check_time_limit(self) -> None:
        if self.hard_limit is None or self.current is None or self.executor is None:
            return
        if time.monotonic() < self.started_at + self.hard_limit:
            return
        delivery, limit = self.current, self.hard_limit
        log.error(
            "task %s[%s] exceeded its time limit of %gs; stopping it",
            delivery.task_name,
            delivery.task_id,
            limit,
        )
        self.executor.kill()
        self._replace_executor()
        exc = TimeLimitExceeded(
            f"task {delivery.task_name}[{delivery.task_id}] ran past time_limit={limit:g}s "
            "and was stopped"
        )
        outcome = failure_outcome(delivery.task_id or "", exc, kind="done",
                                  worker=answerer(delivery.headers, self.options.hostname))
        self._finish(outcome._replace(after=self._flow_failure(delivery, exc)))

    def _replace_executor(self) -> None:
        """Close the executor; a new one starts when a time-limited task next needs it."""
        if self.executor is not None:
            self.executor.close()
            self.executor = None
            self._executor_changed = True


def resident_mib() -> float:
    """This process's resident memory now, in MiB (Linux; 0 where /proc can't tell)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


def _run_key(delivery: Delivery) -> tuple[str, Any]:
    return (delivery.task_id or "", delivery.headers.get("retries") or 0)


#: Arguments up to this size (as JSON) also reach ``inspect active`` as values, not reprs.
SMALL_ARGUMENTS = 2048
#: A body bigger than this is told by its size only (events, ``inspect active``).
REPORTED_BODY = 64 * 1024


def _small_values(args: Any, kwargs: Any) -> dict[str, Any]:
    """``{"args_value": ..., "kwargs_value": ...}`` when both are small JSON, else nothing."""
    try:
        text = json.dumps([args, kwargs])
    except (TypeError, ValueError):
        return {}
    if len(text) > SMALL_ARGUMENTS:
        return {}
    return {"args_value": args, "kwargs_value": kwargs}


#: How much of a JSON body the run record keeps for ``inspect active``.
RECORDED_ARGUMENTS = 1024


def _arguments_text(delivery: Delivery) -> str:
    if delivery.content_type != "application/json":
        return ""
    return delivery.body[:RECORDED_ARGUMENTS].decode("utf-8", "replace")
