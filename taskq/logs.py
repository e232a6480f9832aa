"""Logging setup for the worker and its child processes."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s"


def setup_logging(level: int | str) -> None:
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    # py-amqp logs every frame at DEBUG, and frames that cross a channel's close at WARNING
    # (harmless: taskq closes channels with messages in flight on purpose). Keep both out
    # unless asked for.
    verbose = int(level) <= logging.DEBUG
    logging.getLogger("amqp").setLevel(logging.DEBUG if verbose else logging.ERROR)
