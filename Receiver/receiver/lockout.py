"""Brute-force protection for SMTP AUTH, per client address, shared by every Receiver process.

Redis keys (see :mod:`common.keys`):

* ``IB:receiver:authfail:<ip>`` -- failed logins in the current window (INCR; expires after
  ``auth-lockout.window-seconds`` from the first failure);
* ``IB:receiver:lockout:<ip>`` -- present while the address is locked out
  (``lockout-seconds``).

Every failed reply is delayed by ``delay-seconds`` (without blocking other sessions).  After
``max-failures`` failures within the window the address gets ``454 4.7.0`` for every AUTH until
the lockout expires, even with the right password.  When Redis is unreachable the guard lets
the attempt through (logins do not depend on Redis) but the delay and the per-session limit
still apply.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from dataclasses import dataclass

import redis.asyncio
import redis.exceptions

from common import keys
from common.config.receiver import AuthLockout

log = logging.getLogger(__name__)

SERVICE = "receiver"
_REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ResponseError)


def client_key(peer_ip: str) -> str:
    """Normalised address for the keys (IPv4-mapped IPv6 becomes IPv4)."""
    try:
        addr = ipaddress.ip_address(peer_ip.split("%", 1)[0])
    except ValueError:
        return peer_ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.compressed


def failures_key(ip: str) -> str:
    """Failed-AUTH counter of one client address."""
    return keys.service_key(SERVICE, "authfail", ip)


def lockout_key(ip: str) -> str:
    """Lockout marker of one client address."""
    return keys.service_key(SERVICE, "lockout", ip)


@dataclass
class AuthGuard:
    """Counts failed logins per address in Redis and locks addresses out."""

    client: redis.asyncio.Redis
    settings: AuthLockout

    async def locked_for(self, ip: str) -> float:
        """Seconds ``ip`` stays locked out (0 when it may try)."""
        try:
            ttl_ms = await self.client.pttl(lockout_key(ip))
        except _REDIS_ERRORS as exc:
            log.warning("cannot check AUTH lockout (Redis: %s); allowing the attempt", exc)
            return 0.0
        return max(int(ttl_ms), 0) / 1000.0

    async def failed(self, ip: str) -> bool:
        """Record a failed login; True when it locked the address out."""
        window_ms = max(int(self.settings.window_seconds * 1000), 1)
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.incr(failures_key(ip))
            pipe.pexpire(failures_key(ip), window_ms, nx=True)
            count = int((await pipe.execute())[0])
            if count < self.settings.max_failures or self.settings.lockout_seconds <= 0:
                return False
            pipe = self.client.pipeline(transaction=True)
            pipe.set(lockout_key(ip), str(count), px=max(int(self.settings.lockout_seconds * 1000), 1))
            pipe.delete(failures_key(ip))
            await pipe.execute()
        except _REDIS_ERRORS as exc:
            log.warning("cannot record a failed AUTH (Redis: %s)", exc)
            return False
        log.warning("AUTH locked out for %ss after %d failures from %s", self.settings.lockout_seconds, count, ip)
        return True

    async def succeeded(self, ip: str) -> None:
        """A successful login clears the address's failure count."""
        try:
            await self.client.delete(failures_key(ip))
        except _REDIS_ERRORS as exc:
            log.debug("cannot clear AUTH failures (Redis: %s)", exc)


def seconds_text(seconds: float) -> str:
    """Whole seconds, rounded up, for replies."""
    return str(max(math.ceil(seconds), 1))
