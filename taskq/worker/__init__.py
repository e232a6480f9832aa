"""The worker side: ``taskq worker`` (see :mod:`taskq.worker.supervisor`)."""

from __future__ import annotations

from .supervisor import Worker

__all__ = ["Worker"]
