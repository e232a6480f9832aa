"""taskq: a simple, fast task queue that keeps its promises under failure, on one machine with
nothing installed (its embedded broker) or on many with RabbitMQ.

>>> from taskq import App
>>> app = App()                 # $TASKQ_BROKER_URL, else the embedded sqlite:///taskq.db
>>> @app.task
... def add(x, y):
...     return x + y
>>> add.delay(2, 3).get(timeout=10)   # with `taskq worker -A tasks:app` running
5
"""

from __future__ import annotations

import logging

from .app import App, default_app, task
from .canvas import Chain, Chord, Group, GroupResult, Signature, chain, chord, group, signature
from .config import Config
from .errors import (
    AppLoadError,
    BatchPublishError,
    BrokerError,
    BrokerUnavailable,
    ChordError,
    ConfigurationError,
    ContentDisallowed,
    DeclarationConflict,
    DecodeError,
    EncodeError,
    MaxRetriesExceededError,
    MessageDecodeError,
    MessageNacked,
    MessageRejected,
    MessageTooLarge,
    NotRegistered,
    PublishError,
    RemoteError,
    ResultUnavailable,
    Retry,
    SerializationError,
    SoftTimeLimitExceeded,
    TaskExpired,
    TaskFailure,
    TaskqError,
    TaskRevoked,
    TimeLimitExceeded,
    TimeoutError,
    Unroutable,
    WorkerLostError,
)
from .hooks import TaskRun
from .result import AsyncResult, BroadcastResult, EagerResult
from .task import Request, Task
from .waiting import as_completed, gather

__version__ = "0.1.0"

# A library logs; the application decides where it goes (``taskq worker`` sets up its own).
logging.getLogger("taskq").addHandler(logging.NullHandler())

__all__ = [
    "App",
    "AppLoadError",
    "AsyncResult",
    "BatchPublishError",
    "BroadcastResult",
    "BrokerError",
    "BrokerUnavailable",
    "Chain",
    "Chord",
    "ChordError",
    "Config",
    "ConfigurationError",
    "ContentDisallowed",
    "DeclarationConflict",
    "DecodeError",
    "EagerResult",
    "EncodeError",
    "Group",
    "GroupResult",
    "MaxRetriesExceededError",
    "MessageDecodeError",
    "MessageNacked",
    "MessageRejected",
    "MessageTooLarge",
    "NotRegistered",
    "PublishError",
    "RemoteError",
    "Request",
    "ResultUnavailable",
    "Retry",
    "SerializationError",
    "Signature",
    "SoftTimeLimitExceeded",
    "Task",
    "TaskExpired",
    "TaskFailure",
    "TaskRevoked",
    "TaskRun",
    "TaskqError",
    "TimeLimitExceeded",
    "TimeoutError",
    "Unroutable",
    "WorkerLostError",
    "__version__",
    "as_completed",
    "chain",
    "chord",
    "default_app",
    "gather",
    "group",
    "signature",
    "task",
]
