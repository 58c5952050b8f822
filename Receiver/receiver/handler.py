"""The aiosmtpd handler: AUTH, envelope checks and the durable hand-off of each message.

Produces ``IB-MAIL-QUEUE-P0`` (``X-Priority: 0``) and ``IB-MAIL-QUEUE-P1`` (the names of the
global file) entries of type :class:`~common.payloads.SubmittedMail`, and the first entry of
the message's timeline (``IB:trace:<uuid>``, same MULTI/EXEC); consumes nothing.

A message gets ``250`` only after Redis has acknowledged the entry (with AOF
``appendfsync always`` that means it is on disk).  The bytes queued are the ones received
(after dot-unstuffing) passed through the intake rule both doors share,
:func:`common.submission.accept` (line endings normalised, header fields checked).  The SMTP
envelope decides nothing: recipients come from the ``To``/``Cc`` headers (DESIGN §2), so
MAIL/RCPT are only syntax-checked.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from aiosmtpd.smtp import MISSING, AuthResult, Envelope, TLSSetupException

from common import logs, trace
from common import smtpreplies as replies
from common.authguard import AsyncLoginGuard, Attempt, Checked, Refused, seconds_text
from common.config.base import SmtpAuthLockout
from common.errors import QueueFullError, QueueUnavailableError, ReplicaAckError
from common.payloads import SubmittedMail
from common.queue import AsyncQueues
from common.smtpserver import hook_names
from common.submission import Rejection, accept
from common.trace import TraceSettings
from receiver.accounts import Accounts
from receiver.metrics import ReceiverMetrics
from receiver.protocol import SubmissionSession, SubmissionSMTP

log = logging.getLogger(__name__)

MAX_RECIPIENTS: Final = 1000


@dataclass(frozen=True)
class QueueNames:
    """Where accepted mail goes."""

    primary: str
    default: str

    def for_priority(self, priority: int) -> str:
        """The queue of a message with this X-Priority."""
        return self.primary if priority == 0 else self.default


class SubmissionHandler:
    """Hooks aiosmtpd calls for every connection of one process."""

    def __init__(
        self,
        *,
        accounts: Accounts,
        guard: AsyncLoginGuard,
        lockout: SmtpAuthLockout,
        queues: AsyncQueues,
        queue_names: QueueNames,
        is_configured_domain: Callable[[str], bool],
        metrics: ReceiverMetrics,
        max_auth_failures_per_session: int,
        trace_settings: TraceSettings = trace.DISABLED,
    ) -> None:
        self.accounts = accounts
        self.guard = guard
        self.lockout = lockout
        self.queues = queues
        self.queue_names = queue_names
        self.is_configured_domain = is_configured_domain
        self.metrics = metrics
        self.max_auth_failures_per_session = max_auth_failures_per_session
        self.trace = trace_settings

    def __dir__(self) -> list[str]:
        """Only the hooks aiosmtpd scans for on every connection (see ``SubmissionSMTP.__dir__``)."""
        return hook_names(type(self), ("handle_", "auth_"))

    # -- AUTH ------------------------------------------------------------------------------

    async def auth_PLAIN(self, server: SubmissionSMTP, args: list[str]) -> AuthResult:
        """AUTH PLAIN (RFC 4616), initial response or one challenge."""
        if len(args) > 1:
            blob: bytes | None = _b64(args[1])
            if blob is None:
                return AuthResult(success=False, handled=False, message=replies.AUTH_BAD_BASE64)
        else:
            answer = await server.challenge_auth("")
            if answer is MISSING:
                return AuthResult(success=False, handled=True)
            blob = answer
        parts = blob.split(b"\0")
        if len(parts) != 3:
            return AuthResult(success=False, handled=False, message=replies.AUTH_BAD_PLAIN)
        if parts[0] not in (b"", parts[1]):
            # RFC 4616: an authorization identity other than the user's own asks to act as
            # someone else; no account may (refused before any password check).
            return AuthResult(success=False, handled=False, message=replies.AUTH_OTHER_IDENTITY)
        return await self._verify(server, parts[1], parts[2])

    async def auth_LOGIN(self, server: SubmissionSMTP, args: list[str]) -> AuthResult:
        """AUTH LOGIN: user name (initial response or challenge), then password."""
        if len(args) > 1:
            user: Any = _b64(args[1])
            if user is None:
                return AuthResult(success=False, handled=False, message=replies.AUTH_BAD_BASE64)
        else:
            user = await server.challenge_auth("Username:")
            if user is MISSING:
                return AuthResult(success=False, handled=True)
        password = await server.challenge_auth("Password:")
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        return await self._verify(server, user, password)

    async def _verify(self, server: SubmissionSMTP, user: bytes, password: bytes) -> AuthResult:
        """The login guard first (common.authguard), the password check only when it allows one."""
        session = server.state
        attempt = Attempt(session.peer_ip, user.decode("utf-8", "surrogateescape"))
        outcome: Refused | Checked | None
        if self.accounts.known(user, password):
            outcome = await self.guard.admit(attempt)
        else:
            outcome = await self.guard.attempt(attempt, lambda: self.accounts.check(user, password))
        if isinstance(outcome, Refused):
            return self._refused(session, outcome)
        if outcome is None or outcome.ok:
            return AuthResult(success=True, auth_data=user.decode("utf-8", "replace"), message=replies.AUTH_OK)
        session.auth_failures += 1
        self.metrics.warnings.inc()
        self.metrics.auth_failures.labels("bad-credentials").inc()
        log.warning("AUTH failed from %s (%d in this session)", session.peer_ip, session.auth_failures)
        # Slows guessing; other sessions keep being served meanwhile.
        await asyncio.sleep(self.lockout.delay_seconds)
        if outcome.locked_out:
            message = replies.auth_locked_out(seconds_text(self.lockout.lockout_seconds))
        elif session.auth_failures >= self.max_auth_failures_per_session:
            message = replies.AUTH_TOO_MANY_IN_SESSION
        else:
            message = replies.AUTH_INVALID
        return AuthResult(success=False, handled=False, message=message)

    def _refused(self, session: SubmissionSession, refused: Refused) -> AuthResult:
        """No password was checked: a temporary ``454 4.7.0`` saying why."""
        self.metrics.auth_failures.labels(refused.reason).inc()
        if refused.reason == "unavailable":
            message = replies.AUTH_UNAVAILABLE
        elif refused.reason == "busy":
            message = replies.auth_busy(seconds_text(refused.retry_after_s))
        else:
            message = replies.auth_locked_out(seconds_text(refused.retry_after_s))
        log.info("AUTH from %s refused before any password check: %s", session.peer_ip, refused.reason)
        return AuthResult(success=False, handled=False, message=message)

    # -- envelope ----------------------------------------------------------------------------

    async def handle_MAIL(
        self,
        server: SubmissionSMTP,
        session: SubmissionSession,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        """Accept any syntactically valid sender (the return path is ours to set)."""
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return replies.SENDER_OK

    async def handle_RCPT(
        self,
        server: SubmissionSMTP,
        session: SubmissionSession,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        """Check the recipient's syntax only: delivery goes to the To/Cc headers' addresses."""
        local, at, domain = address.rpartition("@")
        if not (at and local and domain) or "." not in domain.strip("."):
            return replies.RECIPIENT_SYNTAX
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return replies.too_many_recipients(MAX_RECIPIENTS)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return replies.RECIPIENT_OK

    # -- DATA --------------------------------------------------------------------------------

    async def handle_DATA(self, server: SubmissionSMTP, session: SubmissionSession, envelope: Envelope) -> str:
        """Validate, enqueue durably, then (and only then) say 250."""
        try:
            accepted = accept(envelope.original_content or b"", self.is_configured_domain)
        except Rejection as rejection:
            self.metrics.rejections.labels(rejection.rule).inc()
            self.metrics.dropped.inc()
            log.info("rejected a message from %s: %s", session.peer_ip, rejection.rule)
            return rejection.smtp_reply
        raw, submission = accepted.raw, accepted.submission
        queue = self.queue_names.for_priority(submission.priority)
        mail = SubmittedMail(
            raw=raw, uuid=submission.uuid, priority=submission.priority, via="smtp", submitted_at=time.time()
        )
        started = time.perf_counter()
        try:
            step = trace.entry(
                "accepted", door="smtp", queue=queue, bytes=len(raw), recipients=len(submission.recipients)
            )
            entry_id = await self.queues.enqueue(
                queue, mail.to_fields(), with_writes=trace.append(self.trace, submission.uuid, step)
            )
        except QueueFullError as exc:
            self._temporary("queue-full", submission.uuid, queue, exc)
            return replies.QUEUE_FULL
        except ReplicaAckError as exc:
            # On the primary, not confirmed by a replica (WAIT): the client's retry may queue it twice.
            self._temporary("replica-unconfirmed", submission.uuid, queue, exc)
            return replies.QUEUE_UNAVAILABLE
        except QueueUnavailableError as exc:
            self._temporary("queue-unavailable", submission.uuid, queue, exc)
            return replies.QUEUE_UNAVAILABLE
        self.metrics.enqueue_seconds.observe(time.perf_counter() - started)
        self.metrics.enqueued.inc()
        self.metrics.recipients.inc(len(submission.recipients))
        log.info(
            "accepted %s into %s as %s (%d bytes, %d recipients)",
            submission.uuid,
            queue,
            entry_id,
            len(raw),
            len(submission.recipients),
            extra=logs.fields(uuid=submission.uuid, queue=queue, entry_id=entry_id, peer=session.peer_ip),
        )
        return replies.queued_as(submission.uuid)

    def _temporary(self, reason: str, uuid: str, queue: str, exc: Exception) -> None:
        self.metrics.temporary_failures.labels(reason).inc()
        self.metrics.dropped.inc()
        log.warning("not accepted %s (%s): %s", uuid, queue, exc, extra=logs.fields(uuid=uuid, queue=queue))

    async def handle_exception(self, error: Exception) -> str:
        """Any unexpected error: a temporary failure, so the client keeps the message and retries."""
        if isinstance(error, TLSSetupException):
            # Scanners and clients with no common cipher; aiosmtpd closes the connection.
            log.info("TLS handshake failed: %s", error.__cause__ or error)
            return replies.TLS_UNAVAILABLE
        log.error("unexpected error in an SMTP session", exc_info=error)
        return replies.INTERNAL_ERROR


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return None
