"""``Idempotency-Key`` records: a repeated submission gets the first answer and queues nothing.

Key ``IB:httpreceiver:idem:<user>:<key>`` (see :mod:`common.keys`), a JSON string::

    {"state": "pending" | "done", "fp": <sha256 of the body>, "status": 200, "body": {...}, "nonce": ...}

A request first *reserves* the key with ``SET NX`` (state ``pending``, short TTL), so two
concurrent requests with the same key cannot both enqueue; the loser gets ``409``.  After the
message is queued the record becomes ``done`` for ``idempotency-window-seconds``; if queueing
fails the reservation is removed (only if it is still ours) and the client may retry.  Only
accepted submissions are remembered: refusals change nothing, so repeating them is harmless.

The store talks to Redis with the asyncio client of the send endpoint's event loop
(:mod:`httpreceiver.front`).

Duplicate window: a worker killed between queueing and writing ``done`` leaves a ``pending``
record that expires after :data:`PENDING_TTL_S`; a retry after that queues the message again.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import Any, Final

import redis.asyncio

from common import keys
from common.queue import redis_errors

#: Lifetime of a reservation; must exceed the longest request (Redis timeouts included).
PENDING_TTL_S: Final = 60
#: Longest accepted Idempotency-Key (the IETF draft leaves it to the server).
MAX_KEY_LENGTH: Final = 255

_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def valid_key(key: str) -> bool:
    """1-255 printable ASCII characters, no spaces."""
    return 0 < len(key) <= MAX_KEY_LENGTH and all(33 <= ord(c) <= 126 for c in key)


def fingerprint(body: bytes) -> str:
    """Digest of a request body (a key reused with another body is refused)."""
    return hashlib.sha256(body).hexdigest()


@dataclass(frozen=True)
class Record:
    """What a key holds."""

    state: str
    fp: str
    status: int
    body: dict[str, Any]


@dataclass(frozen=True)
class Reservation:
    """A key this request owns until :meth:`IdempotencyStore.finish` or ``release``."""

    key: str
    value: str
    record: Record


class IdempotencyStore:
    """Reserve / finish / release of idempotency records in Redis."""

    def __init__(self, client: redis.asyncio.Redis, window_s: int) -> None:
        self.client: redis.asyncio.Redis = client
        self.window_s = window_s
        self._release = client.register_script(_RELEASE)

    @staticmethod
    def redis_key(user: str, key: str) -> str:
        """Redis key of ``key`` sent by ``user``."""
        return keys.service_key("httpreceiver", "idem", user, key)

    async def reserve(self, user: str, key: str, fp: str, status: int, body: dict[str, Any]) -> Reservation | Record:
        """Reserve ``key`` for this request, or return the record already there.

        Raises:
            QueueUnavailableError: Redis is down.
        """
        record = Record("pending", fp, status, body)
        value = _encode(record, secrets.token_hex(8))
        name = self.redis_key(user, key)
        with redis_errors("reserve idempotency key"):
            pipe = self.client.pipeline(transaction=True)
            pipe.set(name, value, nx=True, ex=min(PENDING_TTL_S, self.window_s))
            pipe.get(name)
            created, current = await pipe.execute()
        if created:
            return Reservation(name, value, record)
        return _decode(current)

    async def finish(self, reservation: Reservation) -> None:
        """Remember the answer for the whole window.

        Raises:
            QueueUnavailableError: Redis is down (the message is queued anyway).
        """
        done = Record("done", reservation.record.fp, reservation.record.status, reservation.record.body)
        with redis_errors("store idempotency answer"):
            await self.client.set(reservation.key, _encode(done, ""), ex=self.window_s)

    async def release(self, reservation: Reservation) -> None:
        """Drop a reservation whose request failed (only while it is still ours).

        Raises:
            QueueUnavailableError: Redis is down (the reservation expires by itself).
        """
        with redis_errors("release idempotency key"):
            await self._release(keys=[reservation.key], args=[reservation.value])


def _encode(record: Record, nonce: str) -> str:
    return json.dumps(
        {"state": record.state, "fp": record.fp, "status": record.status, "body": record.body, "nonce": nonce},
        separators=(",", ":"),
    )


def _decode(value: bytes | str | None) -> Record:
    """The stored record; something unreadable counts as a reservation in progress (it expires)."""
    try:
        data = json.loads(value or b"")
        return Record(str(data["state"]), str(data["fp"]), int(data["status"]), dict(data["body"]))
    except (ValueError, KeyError, TypeError):
        return Record("pending", "", 0, {})
