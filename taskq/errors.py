"""Every exception taskq raises, under one root: :class:`TaskqError`.

Three families:

* mistakes a caller can fix before anything is sent (configuration, arguments that can't be
  serialised, messages that are too large);
* the broker refusing or being away (:class:`BrokerError` and below);
* a task's outcome seen from the caller (:class:`TaskFailure` and below): what the worker
  reported when the task itself could not produce a value.
"""

from __future__ import annotations

import builtins


class TaskqError(Exception):
    """Root of every exception taskq raises."""


# -- configuration and input ---------------------------------------------------------------------


class ConfigurationError(TaskqError):
    """A setting, option or app reference is wrong; the message says which and how to fix it."""


class AppLoadError(ConfigurationError):
    """``-A module:attribute`` does not name an importable :class:`taskq.App`."""


class SerializationError(TaskqError):
    """A value could not be turned into a message body, or a body back into values."""


class EncodeError(SerializationError, TypeError):
    """Arguments or a return value can't be carried by the serializer (nothing was sent)."""


class DecodeError(SerializationError, ValueError):
    """A message body could not be decoded."""


class MessageTooLarge(TaskqError, ValueError):
    """An encoded task message is over the configured ``max_message_size`` (nothing was sent)."""


# -- the broker ----------------------------------------------------------------------------------


class BrokerError(TaskqError):
    """The broker refused an operation or could not be reached."""


class BrokerUnavailable(BrokerError):
    """The broker could not be reached (or did not confirm) within the configured bound."""


class PublishError(BrokerError):
    """The broker did not accept a published message."""


class Unroutable(PublishError):
    """The broker returned a message because no queue was bound to receive it."""


class MessageNacked(PublishError):
    """The broker answered a publish with a negative confirm (basic.nack)."""


class BatchPublishError(PublishError):
    """Some messages of a batch were not confirmed; ``failed`` holds their task ids."""

    def __init__(self, message: str, failed: list[str]) -> None:
        super().__init__(message)
        self.failed = failed


class DeclarationConflict(BrokerError):
    """A queue or exchange exists with other arguments than taskq declares (AMQP 406)."""


# -- results -------------------------------------------------------------------------------------


class TimeoutError(TaskqError, builtins.TimeoutError):
    """``AsyncResult.get(timeout=...)`` ran out of time; the task may still run and finish."""


class ResultUnavailable(TaskqError):
    """No result will arrive for this handle (ignored results, or the reply queue was lost)."""


# -- a task's outcome, as the caller sees it --------------------------------------------------


class TaskFailure(TaskqError):
    """Base of failures reported by a worker that are not the task's own exception."""


class RemoteError(TaskFailure):
    """A task raised an exception whose type is not rebuilt locally.

    taskq never imports a module named by a message (Celery CVE-2021-23727), so any exception
    that is not a builtin or a taskq error arrives as this, carrying what the worker reported.
    """

    def __init__(
        self, exc_type: str, exc_message: str, traceback: str | None = None, exc_module: str = ""
    ) -> None:
        super().__init__(f"{exc_type}: {exc_message}" if exc_message else exc_type)
        self.exc_type = exc_type
        self.exc_message = exc_message
        self.exc_module = exc_module
        self.remote_traceback = traceback


class MessageRejected(TaskFailure):
    """The worker could not run the message at all; it was moved to the dead-letter queue."""


class NotRegistered(MessageRejected):
    """The worker has no task of that name."""


class ContentDisallowed(MessageRejected):
    """The message's content type is not in the worker's accept list (e.g. pickle)."""


class MessageDecodeError(MessageRejected):
    """The worker could not decode the message body."""


class WorkerLostError(TaskFailure):
    """The process running the task died (killed, crashed) too many times."""


class TimeLimitExceeded(TaskFailure):
    """The task ran past its hard ``time_limit`` and was stopped."""


class SoftTimeLimitExceeded(TaskqError):
    """Raised *inside* a task when its ``soft_time_limit`` passes, so it can clean up."""


class TaskExpired(TaskFailure):
    """The task was past its ``expires`` time when a worker received it; it was not run."""


class TaskRevoked(TaskFailure):
    """The task was revoked (``AsyncResult.revoke()``, ``taskq revoke``): it did not run, or
    was stopped while it ran."""


class MaxRetriesExceededError(TaskFailure):
    """``self.retry()`` was called after ``max_retries`` retries, with no exception to report."""


class ChordError(TaskFailure):
    """A chord's header task failed: the callback did not run (the message names the task)."""


class Retry(TaskqError):
    """Raised by ``self.retry()``: tells the worker to schedule the task again.

    Not an error of the caller's: it never reaches an ``AsyncResult``.
    """

    def __init__(self, countdown: float, exc: BaseException | None = None) -> None:
        super().__init__(f"retry in {countdown:g}s" + (f": {exc!r}" if exc else ""))
        self.countdown = countdown
        self.exc = exc


#: Failure types a result message may name that are rebuilt as themselves (never imported:
#: looked up here by name).  Celery's equivalents map onto taskq's so a Celery worker's
#: failures read the same.
KNOWN_FAILURES: dict[str, type[BaseException]] = {
    cls.__name__: cls
    for cls in (
        NotRegistered,
        ContentDisallowed,
        MessageDecodeError,
        MessageRejected,
        WorkerLostError,
        TimeLimitExceeded,
        SoftTimeLimitExceeded,
        TaskExpired,
        TaskRevoked,
        MaxRetriesExceededError,
        ChordError,
        Unroutable,
        ResultUnavailable,
        EncodeError,
        DecodeError,
    )
}
KNOWN_FAILURES["TaskRevokedError"] = TaskRevoked  # Celery's name
KNOWN_FAILURE_MODULES = frozenset({__name__, "celery.exceptions", "billiard.exceptions"})
