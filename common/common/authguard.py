"""Brute-force protection for password logins, per client address, shared by every process.

Used in front of the two submission doors: Receiver's SMTP AUTH (asyncio, :class:`AsyncAuthGuard`)
and HttpReceiver's HTTP Basic / bearer keys (threads, :class:`AuthGuard`).  State lives in Redis
so that every process and every pod of a service sees the same counts (keys in
:mod:`common.keys`)::

  IB:<service>:authfail:<ip>   failed logins in the current window (expires window-seconds
                               after the first failure)
  IB:<service>:lockout:<ip>    present while the address is locked out (lockout-seconds)

After ``max-failures`` failures within the window the address is refused for
``lockout-seconds``, even with the right credentials.  Recording a failure is one Lua call, so
concurrent failures from many processes are counted exactly.  When Redis is unreachable the
guard lets the attempt through (logins never depend on Redis) and logs a warning.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from typing import Final

import redis
import redis.asyncio
import redis.exceptions

from common import keys
from common.config.base import AuthLockout

log = logging.getLogger(__name__)

REDIS_ERRORS: Final = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ResponseError,
)

#: Most addresses a process remembers as recently clean (:class:`AuthGuard`).
_CLEAN_CACHE_SIZE: Final = 10_000

#: KEYS: failures, lockout.  ARGV: window ms, max failures, lockout ms.
#: Returns the failure count when this failure locked the address out, else 0.
_RECORD_FAILURE: Final = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
if count < tonumber(ARGV[2]) or tonumber(ARGV[3]) <= 0 then return 0 end
redis.call('SET', KEYS[2], count, 'PX', ARGV[3])
redis.call('DEL', KEYS[1])
return count
"""


def client_key(peer_ip: str) -> str:
    """Normalised address for the keys (IPv4-mapped IPv6 becomes IPv4, zone ids dropped)."""
    try:
        addr = ipaddress.ip_address(peer_ip.split("%", 1)[0])
    except ValueError:
        return peer_ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.compressed


def failures_key(service: str, ip: str) -> str:
    """Failed-login counter of one client address."""
    return keys.service_key(service, "authfail", client_key(ip))


def lockout_key(service: str, ip: str) -> str:
    """Lockout marker of one client address."""
    return keys.service_key(service, "lockout", client_key(ip))


def seconds_text(seconds: float) -> str:
    """Whole seconds, rounded up, for replies and ``Retry-After``."""
    return str(max(math.ceil(seconds), 1))


class _Guard:
    """What both flavours share: the keys and the Lua call's arguments."""

    def __init__(self, service: str, settings: AuthLockout) -> None:
        self.service = service
        self.settings = settings

    def _failure_call(self, ip: str) -> tuple[str, int, str, str, int, int, int]:
        window_ms = max(int(self.settings.window_seconds * 1000), 1)
        lockout_ms = int(self.settings.lockout_seconds * 1000)
        return (
            _RECORD_FAILURE,
            2,
            failures_key(self.service, ip),
            lockout_key(self.service, ip),
            window_ms,
            self.settings.max_failures,
            lockout_ms,
        )

    def _locked(self, ip: str, count: int) -> bool:
        if count:
            log.warning(
                "%s: logins locked out for %ss after %d failures from %s",
                self.service,
                self.settings.lockout_seconds,
                count,
                ip,
            )
        return bool(count)


class AuthGuard(_Guard):
    """The guard for a synchronous Redis client (HttpReceiver's threads, one guard per process).

    An HTTP client authenticates on every request, so asking Redis each time would cost a round
    trip per submission.  An address that just logged in successfully is remembered as clean
    for ``clean_for_s`` and not checked again meanwhile; any failure from it in this process
    forgets that at once.  So only an address that knows valid credentials, and only during
    that short time after a success, can skip the check (at most one guess per process before
    its first failure sends it back to Redis).  The failure count itself is never skipped.
    """

    def __init__(self, client: redis.Redis, service: str, settings: AuthLockout, *, clean_for_s: float = 1.0) -> None:
        super().__init__(service, settings)
        self.client = client
        self.clean_for_s = clean_for_s
        self._clean_until: dict[str, float] = {}

    def locked_for(self, ip: str) -> float:
        """Seconds ``ip`` stays locked out (0 when it may try)."""
        if self._clean_until.get(ip, 0.0) > time.monotonic():
            return 0.0
        try:
            ttl_ms = int(self.client.pttl(lockout_key(self.service, ip)))
        except REDIS_ERRORS as exc:
            log.warning("cannot check the login lockout (Redis: %s); allowing the attempt", exc)
            return 0.0
        return max(ttl_ms, 0) / 1000.0

    def succeeded(self, ip: str) -> None:
        """``ip`` (just checked by :meth:`locked_for`) logged in: remember it as clean for a moment."""
        if len(self._clean_until) >= _CLEAN_CACHE_SIZE:
            now = time.monotonic()
            self._clean_until = {key: until for key, until in self._clean_until.items() if until > now}
            if len(self._clean_until) >= _CLEAN_CACHE_SIZE:
                return
        self._clean_until[ip] = time.monotonic() + self.clean_for_s

    def failed(self, ip: str) -> bool:
        """Record a failed login; True when it locked the address out."""
        self._clean_until.pop(ip, None)
        try:
            count = int(self.client.eval(*self._failure_call(ip)))
        except REDIS_ERRORS as exc:
            log.warning("cannot record a failed login (Redis: %s)", exc)
            return False
        return self._locked(ip, count)


class AsyncAuthGuard(_Guard):
    """The guard for an asyncio Redis client (Receiver's SMTP sessions)."""

    def __init__(self, client: redis.asyncio.Redis, service: str, settings: AuthLockout) -> None:
        super().__init__(service, settings)
        self.client = client

    async def locked_for(self, ip: str) -> float:
        """Seconds ``ip`` stays locked out (0 when it may try)."""
        try:
            ttl_ms = int(await self.client.pttl(lockout_key(self.service, ip)))
        except REDIS_ERRORS as exc:
            log.warning("cannot check the login lockout (Redis: %s); allowing the attempt", exc)
            return 0.0
        return max(ttl_ms, 0) / 1000.0

    async def failed(self, ip: str) -> bool:
        """Record a failed login; True when it locked the address out."""
        try:
            count = int(await self.client.eval(*self._failure_call(ip)))
        except REDIS_ERRORS as exc:
            log.warning("cannot record a failed login (Redis: %s)", exc)
            return False
        return self._locked(ip, count)

    async def succeeded(self, ip: str) -> None:
        """A successful login clears the address's failure count."""
        try:
            await self.client.delete(failures_key(self.service, ip))
        except REDIS_ERRORS as exc:
            log.debug("cannot clear login failures (Redis: %s)", exc)
