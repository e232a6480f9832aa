"""Logging a broker outage once for the whole worker, not once per slot per retry."""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("taskq.worker")


class OutageLog:
    """Logs a broker outage once for the whole worker, not once per slot per retry.

    A slot busy with a task notices its connection died only when the task ends, perhaps
    after the other slots have reconnected: a connection opened before the outage already
    announced is a straggler of that outage, not a new one.
    """

    def __init__(self, display_url: str) -> None:
        self.display_url = display_url
        self._lost: set[str] = set()
        self._announced = False
        self._outage_started = float("-inf")
        self._lock = threading.Lock()
        #: Slot reconnections so far (a lost link that came back), for the metrics.
        self.reconnects = 0

    def connection_lost(self, slot: str, reason: str, opened_at: float | None = None) -> None:
        """``opened_at``: when the connection that failed was opened (monotonic clock)."""
        with self._lock:
            self._lost.add(slot)
            straggler = opened_at is not None and opened_at < self._outage_started
            announce = not self._announced and not straggler
            if announce:
                self._announced = True
                self._outage_started = time.monotonic()
        if announce:
            log.warning(
                "lost the connection to the broker at %s (%s); reconnecting",
                self.display_url,
                reason,
            )
        elif straggler:
            log.debug("%s also lost its connection in the last outage (%s)", slot, reason)

    def connection_restored(self, slot: str) -> None:
        with self._lock:
            if slot not in self._lost:
                return
            self._lost.discard(slot)
            self.reconnects += 1
            done = not self._lost and self._announced
            if done:
                self._announced = False
        if done:
            log.warning("reconnected to the broker at %s", self.display_url)

    def holding(self, slot: str, handle: int | None) -> None:
        pass  # slots in this process: nobody outlives them to settle their deaths
