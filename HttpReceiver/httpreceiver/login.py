"""Who calls an authenticated endpoint: the credentials, checked behind the login guard.

One decision in two flavours: :class:`AsyncLogin` for ``POST /v1/mail/send``, answered in the
worker's event loop (:mod:`httpreceiver.front`), and :class:`Login` for the Flask endpoints of
the control API (request threads).  Either returns the caller's name or the answer to give:

* ``401`` no or wrong credentials (HTTP Basic or a bearer API key);
* ``429`` too many wrong credentials from this address or for this account, or too many logins
  of them being checked at once (``httpreceiver.auth-lockout``, ``Retry-After``): no password
  was checked;
* ``503`` the login guard cannot reach Redis (``Retry-After``): no password is checked without it.

Credentials that verified before (:meth:`Authenticator.known`) skip the password check, never
the guard (:mod:`common.authguard`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable

from common.authguard import AsyncLoginGuard, Attempt, LoginGuard, Outcome, Refused, seconds_text
from httpreceiver.auth import Authenticator, Credentials
from httpreceiver.metrics import HttpMetrics
from httpreceiver.responses import Answer

log = logging.getLogger(__name__)

#: Runs a blocking call (a password hash) away from the event loop.
RunBlocking = Callable[[Callable[[], bool]], Awaitable[bool]]


class _Login:
    """What both flavours share: the answers and reading the guard's outcome."""

    def __init__(self, auth: Authenticator, metrics: HttpMetrics) -> None:
        self.auth = auth
        self.metrics = metrics

    def unauthorized(self, reason: str, peer: str) -> Answer:
        """401 with the challenge."""
        self.metrics.auth_failures.labels(reason).inc()
        log.warning("refused submission from %s: missing or wrong credentials", peer)
        return Answer.error(
            401,
            "unauthorized",
            "HTTP Basic credentials (or a bearer API key) from httpreceiver.auth-logins are required",
            {"WWW-Authenticate": self.auth.challenge()},
        )

    def refused(self, refused: Refused, peer: str) -> Answer:
        """No password was checked: 429 (lockout, too many attempts) or 503 (guard unavailable)."""
        self.metrics.auth_failures.labels(refused.reason).inc()
        wait = seconds_text(refused.retry_after_s)
        log.info("refused a login from %s before any password check: %s", peer, refused.reason)
        if refused.reason == "unavailable":
            return Answer.error(
                503,
                "auth-unavailable",
                f"credentials cannot be checked right now; retry in {wait} seconds",
                {"Retry-After": wait},
            )
        return Answer.error(
            429,
            "too-many-failed-logins",
            f"too many wrong credentials from your address or for this account; try again in {wait} seconds",
            {"Retry-After": wait},
        )

    def _credentials(self, header: str | None, peer: str) -> Credentials | Answer:
        credentials = self.auth.parse(header)
        if credentials is None:
            return self.unauthorized("bad-credentials" if header else "no-credentials", peer)
        return credentials

    def _verify(self, credentials: Credentials, found: list[str]) -> bool:
        name = self.auth.verify(credentials)
        if name is not None:
            found.append(name)
        return name is not None

    def _decided(self, outcome: Outcome, found: list[str], peer: str) -> str | Answer:
        if isinstance(outcome, Refused):
            return self.refused(outcome, peer)
        if outcome.ok and found:
            return found[0]
        return self.unauthorized("bad-credentials", peer)


class Login(_Login):
    """The check for request threads (synchronous Redis client)."""

    def __init__(self, auth: Authenticator, guard: LoginGuard, metrics: HttpMetrics) -> None:
        super().__init__(auth, metrics)
        self.guard = guard

    def check(self, header: str | None, peer: str) -> str | Answer:
        """The caller's name for an ``Authorization`` value from ``peer``, or the refusal."""
        credentials = self._credentials(header, peer)
        if isinstance(credentials, Answer):
            return credentials
        attempt = Attempt(peer, credentials.account)
        name = self.auth.known(credentials)
        if name is not None:
            refused = self.guard.admit(attempt)
            return name if refused is None else self.refused(refused, peer)
        found: list[str] = []
        outcome = self.guard.attempt(attempt, lambda: self._verify(credentials, found))
        return self._decided(outcome, found, peer)


class AsyncLogin(_Login):
    """The check for the event loop: the password hash runs through ``run_blocking``."""

    def __init__(
        self, auth: Authenticator, guard: AsyncLoginGuard, metrics: HttpMetrics, run_blocking: RunBlocking
    ) -> None:
        super().__init__(auth, metrics)
        self.guard = guard
        self.run_blocking = run_blocking

    async def check(self, header: str | None, peer: str) -> str | Answer:
        """See :meth:`Login.check`."""
        credentials = self._credentials(header, peer)
        if isinstance(credentials, Answer):
            return credentials
        attempt = Attempt(peer, credentials.account)
        name = self.auth.known(credentials)
        if name is not None:
            refused = await self.guard.admit(attempt)
            return name if refused is None else self.refused(refused, peer)
        found: list[str] = []
        verify = functools.partial(self._verify, credentials, found)
        outcome = await self.guard.attempt(attempt, lambda: self.run_blocking(verify))
        return self._decided(outcome, found, peer)
