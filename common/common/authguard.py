"""Brute-force protection of password logins: fails closed and cannot be raced.

Used in front of the two submission doors: Receiver's SMTP AUTH (asyncio, :class:`AsyncLoginGuard`)
and HttpReceiver's HTTP Basic / bearer keys (threads, :class:`LoginGuard`).  State lives in Redis
so that every process and every pod of a service sees the same counts.  Each login is counted
for two *subjects*, the client address and the account (bearer keys: the address only), each
with three keys (:mod:`common.keys`)::

  IB:<service>:authfail:<kind>:<id>     failed logins within ``window-seconds`` of the first
  IB:<service>:authflight:<kind>:<id>   logins being checked right now (reservations)
  IB:<service>:lockout:<kind>:<id>      present while the subject is locked out

``<kind>`` is ``ip`` (the normalised address) or ``user`` (:func:`account_id`, a digest of the
name).  One login goes like this:

1. **Reserve** (one Lua call, atomic): refused when either subject is locked out, or when its
   failures plus the logins in flight already reach ``max-failures``; otherwise both flight
   counters go up.  Only then is the password checked -- so however many attempts arrive in
   parallel, at most ``max-failures`` passwords are checked per address and per account within
   the window.
2. **Finish** (one Lua call): the reservation is returned; a failure is counted for both
   subjects and locks out each that reached ``max-failures`` for ``lockout-seconds``.  A
   success removes nothing but its own reservation: one account's success never clears the
   failures of another (or of the address).

Credentials that already verified in this process (the caller's cache) skip the password check
and the reservation, but not the guard: :meth:`LoginGuard.admit` refuses them under the same
conditions (a correct guess beyond the budget is refused like any other).

When Redis cannot answer (down, timeout, pool exhausted) the guard **fails closed**: the login
is refused as temporarily unavailable (SMTP ``454 4.7.0``, HTTP ``503`` with ``Retry-After``)
and no password is checked.  ``lockout-seconds: 0`` switches the guard off (tests only).
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import redis
import redis.asyncio
import redis.exceptions

from common import keys
from common.coalesce import Coalescer
from common.config.base import AuthLockout

log = logging.getLogger(__name__)

REDIS_ERRORS: Final = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ResponseError,
)

#: A reservation nobody returns (its process died) stops counting after this long.
FLIGHT_TTL_MS: Final = 60_000
#: Retry-After of a temporary refusal: Redis unavailable / too many logins in flight.
RETRY_UNAVAILABLE_S: Final = 5.0
RETRY_BUSY_S: Final = 2.0

#: KEYS: (fail, flight, lock) per subject.  ARGV: max failures.
#: Returns {0, 0} when every subject has budget left, {1, ms} locked out, {2, ms} budget in use.
_STATE: Final = """
local max = tonumber(ARGV[1])
for i = 1, #KEYS, 3 do
  local locked = redis.call('PTTL', KEYS[i + 2])
  if locked > 0 then return {1, locked} end
  local failed = tonumber(redis.call('GET', KEYS[i]) or '0')
  local flying = tonumber(redis.call('GET', KEYS[i + 1]) or '0')
  if failed + flying >= max then
    if failed >= max then return {2, redis.call('PTTL', KEYS[i])} end
    return {2, -1}
  end
end
"""
_CHECK: Final = _STATE + "return {0, 0}\n"
#: ARGV: max failures, flight ttl ms.  As _CHECK, and on {0, 0} one reservation per subject.
_RESERVE: Final = (
    _STATE
    + """
for i = 1, #KEYS, 3 do
  redis.call('INCR', KEYS[i + 1])
  redis.call('PEXPIRE', KEYS[i + 1], ARGV[2])
end
return {0, 0}
"""
)
#: KEYS: as above.  ARGV: failed (0/1), max failures, window ms, lockout ms.
#: Returns, per subject, the failure count that locked it out now (0: not locked now).
_FINISH: Final = """
local out = {}
for i = 1, #KEYS, 3 do
  if redis.call('DECR', KEYS[i + 1]) <= 0 then redis.call('DEL', KEYS[i + 1]) end
  local locked = 0
  if ARGV[1] == '1' then
    local count = redis.call('INCR', KEYS[i])
    if count == 1 then redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
    if count >= tonumber(ARGV[2]) then
      redis.call('SET', KEYS[i + 2], count, 'PX', ARGV[4])
      redis.call('DEL', KEYS[i])
      locked = count
    end
  end
  out[#out + 1] = locked
end
return out
"""

#: The reply of _CHECK that admits.
_ADMITTED: Final = (0, 0)

Reason = Literal["locked-out", "busy", "unavailable"]


def _admitted(values: Sequence[bytes | None], max_failures: int) -> bool:
    """True when an MGET of (fail, flight, lock) per subject shows what makes _CHECK admit.

    False when in doubt (a lockout marker, the budget used up, a value that is no number): the
    script decides those.
    """
    for at in range(0, len(values), 3):
        failed, flying, locked = values[at : at + 3]
        if locked is not None:
            return False
        try:
            if int(failed or 0) + int(flying or 0) >= max_failures:
                return False
        except ValueError:
            return False
    return True


@functools.lru_cache(maxsize=4096)
def client_key(peer_ip: str) -> str:
    """Normalised address for the keys (IPv4-mapped IPv6 becomes IPv4, zone ids dropped).

    Cached: every SMTP connection asks, and parsing an address is a tenth of a connection's set-up.
    """
    try:
        addr = ipaddress.ip_address(peer_ip.split("%", 1)[0])
    except ValueError:
        return peer_ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.compressed


def account_id(name: str) -> str:
    """The account's id in key names: a digest, so no client-chosen bytes reach Redis keys."""
    return hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def failures_key(service: str, kind: str, ident: str) -> str:
    """Failed-login counter of one subject (``kind`` ip or user)."""
    return keys.service_key(service, "authfail", kind, ident)


def flight_key(service: str, kind: str, ident: str) -> str:
    """Logins of one subject being checked right now."""
    return keys.service_key(service, "authflight", kind, ident)


def lockout_key(service: str, kind: str, ident: str) -> str:
    """Lockout marker of one subject."""
    return keys.service_key(service, "lockout", kind, ident)


def seconds_text(seconds: float) -> str:
    """Whole seconds, rounded up, for replies and ``Retry-After``."""
    return str(max(math.ceil(seconds), 1))


@dataclass(frozen=True)
class Refused:
    """The login was not attempted: why, and when to try again."""

    reason: Reason
    retry_after_s: float


@dataclass(frozen=True)
class Checked:
    """The password was checked: the result, and whether this failure locked a subject out."""

    ok: bool
    locked_out: bool = False


Outcome = Refused | Checked


@dataclass(frozen=True)
class Attempt:
    """Who logs in: the client address and the account (None for a bearer key)."""

    ip: str
    account: str | None = None


@functools.lru_cache(maxsize=1024)  # bounded: an account name is up to a header's 8 KB
def _subject_keys(service: str, attempt: Attempt) -> tuple[str, ...]:
    """(fail, flight, lock) of each subject of ``attempt``: parsed and hashed once per client and account."""
    out: list[str] = []
    for kind, ident in _subjects(attempt):
        out += [failures_key(service, kind, ident), flight_key(service, kind, ident), lockout_key(service, kind, ident)]
    return tuple(out)


def _subjects(attempt: Attempt) -> list[tuple[str, str]]:
    subjects = [("ip", client_key(attempt.ip))]
    if attempt.account is not None:
        subjects.append(("user", account_id(attempt.account)))
    return subjects


class _Guard:
    """What both flavours share: key lists, arguments, and reading the scripts' answers."""

    def __init__(self, service: str, settings: AuthLockout) -> None:
        self.service = service
        self.settings = settings

    @property
    def enabled(self) -> bool:
        """False with ``lockout-seconds: 0``."""
        return self.settings.lockout_seconds > 0

    def _keys(self, attempt: Attempt) -> tuple[str, ...]:
        return _subject_keys(self.service, attempt)

    def _check_args(self, attempt: Attempt) -> tuple[Any, ...]:
        names = self._keys(attempt)
        return (_CHECK, len(names), *names, self.settings.max_failures)

    def _reserve_args(self, attempt: Attempt) -> tuple[Any, ...]:
        names = self._keys(attempt)
        return (_RESERVE, len(names), *names, self.settings.max_failures, FLIGHT_TTL_MS)

    def _finish_args(self, attempt: Attempt, failed: bool) -> tuple[Any, ...]:
        names = self._keys(attempt)
        window_ms = max(int(self.settings.window_seconds * 1000), 1)
        lockout_ms = max(int(self.settings.lockout_seconds * 1000), 1)
        return (_FINISH, len(names), *names, int(failed), self.settings.max_failures, window_ms, lockout_ms)

    def _state(self, reply: Any, attempt: Attempt) -> Refused | None:
        code, ms = int(reply[0]), int(reply[1])
        if code == 0:
            return None
        if code == 1:
            return Refused("locked-out", ms / 1000.0)
        log.warning(
            "%s: login from %s refused: %d failed or running logins reached max-failures",
            self.service,
            attempt.ip,
            self.settings.max_failures,
        )
        return Refused("busy", ms / 1000.0 if ms > 0 else RETRY_BUSY_S)

    def _unavailable(self, exc: Exception) -> Refused:
        log.warning("%s: cannot check the login lockout (Redis: %s); refusing the login", self.service, exc)
        return Refused("unavailable", RETRY_UNAVAILABLE_S)

    def _finished(self, reply: Any, attempt: Attempt, failed: bool) -> Checked:
        counts = [int(c) for c in reply] if isinstance(reply, list) else []
        locked = [kind for (kind, _), count in zip(_subjects(attempt), counts, strict=False) if count]
        if locked:
            log.warning(
                "%s: logins locked out for %ss after %d failures (%s; address %s)",
                self.service,
                self.settings.lockout_seconds,
                self.settings.max_failures,
                " and ".join("address" if kind == "ip" else "account" for kind in locked),
                attempt.ip,
            )
        return Checked(ok=not failed, locked_out=bool(locked))


class LoginGuard(_Guard):
    """The guard for a synchronous Redis client (HttpReceiver's request threads)."""

    def __init__(self, client: redis.Redis, service: str, settings: AuthLockout) -> None:
        super().__init__(service, settings)
        self.client = client

    def admit(self, attempt: Attempt) -> Refused | None:
        """For credentials known to be right (no password check): refused like any other login?"""
        if not self.enabled:
            return None
        try:
            return self._state(self.client.eval(*self._check_args(attempt)), attempt)
        except REDIS_ERRORS as exc:
            return self._unavailable(exc)

    def attempt(self, attempt: Attempt, verify: Callable[[], bool]) -> Outcome:
        """Reserve, then (only then) call ``verify``, then count the result."""
        if not self.enabled:
            return Checked(verify())
        try:
            refused = self._state(self.client.eval(*self._reserve_args(attempt)), attempt)
        except REDIS_ERRORS as exc:
            return self._unavailable(exc)
        if refused is not None:
            return refused
        failed = True
        try:
            failed = not verify()
        finally:
            reply = self._finish(attempt, failed)
        return self._finished(reply, attempt, failed)

    def _finish(self, attempt: Attempt, failed: bool) -> Any:
        try:
            return self.client.eval(*self._finish_args(attempt, failed))
        except REDIS_ERRORS as exc:
            # The reservation expires by itself (FLIGHT_TTL_MS); until then it still counts.
            log.warning("%s: cannot record a login result (Redis: %s)", self.service, exc)
            return []


class AsyncLoginGuard(_Guard):
    """The guard for an asyncio Redis client (Receiver's SMTP sessions, HttpReceiver's send endpoint).

    The checks of :meth:`admit` that concurrent tasks make while one is in flight go together in
    the next round trip (:mod:`common.coalesce`): one ``MGET`` of every subject's counters
    decides the usual case -- nobody locked out, budget left -- for the whole batch, and only the
    others run the check script (which also says for how long), in a second round trip.  Under
    load a submission with known credentials costs a share of one command, not a script call.
    """

    def __init__(self, client: redis.asyncio.Redis, service: str, settings: AuthLockout) -> None:
        super().__init__(service, settings)
        self.client = client
        self._checks: Coalescer[None, Attempt, Any] = Coalescer(self._check_batch)

    async def admit(self, attempt: Attempt) -> Refused | None:
        """See :meth:`LoginGuard.admit`."""
        if not self.enabled:
            return None
        try:
            reply = await self._checks.call(None, attempt)
            if isinstance(reply, Exception):
                raise reply
            return self._state(reply, attempt)
        except REDIS_ERRORS as exc:
            return self._unavailable(exc)

    async def _check_batch(self, _key: None, batch: Sequence[Attempt]) -> list[Any]:
        """The check scripts' replies for ``batch``; a script's own error is its caller's reply.

        The MGET's snapshot shows what the script would read; an attempt it clearly admits
        (no lockout marker, failures plus logins in flight under ``max-failures`` for every
        subject) gets the script's "admitted" reply without running it.
        """
        names = [self._keys(attempt) for attempt in batch]
        try:
            values: list[Any] | None = await self.client.mget([name for group in names for name in group])
        except redis.exceptions.ResponseError:  # e.g. NOPERM: a Redis user granted before MGET was used
            values = None  # the scripts decide, as before
        replies: list[Any] = [None] * len(batch)
        unclear: list[int] = []
        start = 0
        for index, group in enumerate(names):
            subjects = None if values is None else values[start : start + len(group)]
            start += len(group)
            if subjects is not None and _admitted(subjects, self.settings.max_failures):
                replies[index] = _ADMITTED
            else:
                unclear.append(index)
        if unclear:
            pipe = self.client.pipeline(transaction=False)
            for index in unclear:
                pipe.eval(*self._check_args(batch[index]))
            for index, reply in zip(unclear, await pipe.execute(raise_on_error=False), strict=True):
                replies[index] = reply
        return replies

    async def attempt(self, attempt: Attempt, verify: Callable[[], Awaitable[bool]]) -> Outcome:
        """See :meth:`LoginGuard.attempt`."""
        if not self.enabled:
            return Checked(await verify())
        try:
            refused = self._state(await self.client.eval(*self._reserve_args(attempt)), attempt)
        except REDIS_ERRORS as exc:
            return self._unavailable(exc)
        if refused is not None:
            return refused
        failed = True
        try:
            failed = not await verify()
        finally:
            reply = await self._finish(attempt, failed)
        return self._finished(reply, attempt, failed)

    async def _finish(self, attempt: Attempt, failed: bool) -> Any:
        try:
            return await self.client.eval(*self._finish_args(attempt, failed))
        except REDIS_ERRORS as exc:
            log.warning("%s: cannot record a login result (Redis: %s)", self.service, exc)
            return []
