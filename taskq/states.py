"""Task states as Celery's result protocol names them."""

from __future__ import annotations

from typing import Final

PENDING: Final = "PENDING"
"""No final outcome has arrived yet (the task may be queued, delayed, running or lost)."""
RETRY: Final = "RETRY"
"""The task failed and was scheduled to run again; a final outcome is still to come."""
SUCCESS: Final = "SUCCESS"
FAILURE: Final = "FAILURE"

READY_STATES: Final = frozenset({SUCCESS, FAILURE})
