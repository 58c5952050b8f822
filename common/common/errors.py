"""The error taxonomy every service shares (style anchor C9).

A handler signals *how* something failed, and the worker loop decides what to do:

* :class:`TemporaryError` -- a dependency is unavailable (Redis down, Postfix not answering,
  webhook 5xx/timeout).  The item is kept and retried with capped, jittered backoff; these
  retries do not use up the item's delivery budget.
* :class:`PermanentError` -- the item itself can never succeed (unparsable message, unknown
  From domain).  It goes to the queue's dead-letter stream at once, with the reason.
* Anything else is a bug: retried a few times (each try counts as a delivery), then
  dead-lettered.
"""

from __future__ import annotations


class MailerError(Exception):
    """Base class of the project's own exceptions."""


class TemporaryError(MailerError):
    """Retry later; the item is fine but something it needs is not available now."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(MailerError):
    """The item can never be processed; dead-letter it with this message as the reason."""


class QueueFullError(TemporaryError):
    """A queue is at its configured length limit (back-pressure on producers)."""


class QueueUnavailableError(TemporaryError):
    """Redis cannot be reached or refused the command."""


class ReplicaAckError(QueueUnavailableError):
    """Written on the Redis primary, but fewer replicas than required confirmed it in time (WAIT).

    The writer answers a temporary failure.  The entries stay on the primary: if it survives, the
    client's retry adds them a second time (a duplicate); if it fails before they reach a replica,
    they are gone, and the retry is the copy that counts.
    """

    def __init__(self, message: str, *, ids: list[str] | None = None) -> None:
        super().__init__(message)
        #: The stream ids the primary gave the entries.
        self.ids = list(ids or ())


class ConfigError(MailerError):
    """Configuration is invalid; ``problems`` holds one human-readable line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))
