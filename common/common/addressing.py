"""Per-message return-path and unsubscribe addresses, tagged so forgeries can be told apart.

The Transformer writes, for a message with uuid ``U`` and return-path domain ``D``:

* envelope sender (bounce address): ``bounce-U-T@D``
* unsubscribe address (``List-Unsubscribe`` mailto): ``unsub-U-T@D``
* one-click unsubscribe token (https ``List-Unsubscribe``): ``U-T``

where ``T`` is a 10-character tag: the first 50 bits of HMAC-SHA256(secret, kind + uuid) in
lower-case base32.  MxServer and HttpReceiver recompute the tag and refuse anything that does
not match, so nobody can bounce, unsubscribe or report a message they did not receive.

The uuid is ``[a-z0-9]+``; keeping it at most :data:`MAX_UUID_LENGTH` characters keeps the
local part within RFC 5321's 64 octets.

The Message-ID of a sent message is built and parsed here too (:func:`message_id`,
:func:`message_id_uuid`): ``<U.S@D>``, where ``S`` is at least 16 characters of time and
randomness, so the id is unique and never short (SpamAssassin's ``MSGID_SHORT``) whatever the
uuid, and MxServer still finds ``U`` in a report that quotes it.

The secret is ``common-config.address-secret``; when unset, :func:`load_secret` creates one
in Redis (``IB:address-secret``) on first use, so every service of an installation agrees.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Final, Literal

import redis

from common import keys
from common.config import Config
from common.retry import DEPENDENCY, Waiter

log = logging.getLogger(__name__)

Kind = Literal["bounce", "unsub"]

TAG_LENGTH: Final = 10
MAX_UUID_LENGTH: Final = 46  # 64 - len("bounce-") - len("-") - TAG_LENGTH
UUID_RE: Final = re.compile(r"[a-z0-9]+")

_LOCAL_RE: Final = re.compile(r"^(bounce|unsub)-([a-z0-9]+)-([a-z2-7]{10})$")
_TOKEN_RE: Final = re.compile(r"^([a-z0-9]+)-([a-z2-7]{10})$")
#: ``<uuid[.suffix]@domain>``: the uuid, then anything dotted (suffix, later tags), then the domain.
#: Ids without a suffix are the ones sent before the suffix existed.
_MESSAGE_ID_RE: Final = re.compile(r"<\s*([a-z0-9]{1,46})((?:\.[a-z0-9-]+)*)@([a-z0-9.-]{1,253})\s*>", re.I)
_B36: Final = "0123456789abcdefghijklmnopqrstuvwxyz"
#: Characters of time (milliseconds, base 36) and of randomness (base 32) in the suffix.
MESSAGE_ID_TIME_CHARS: Final = 8
MESSAGE_ID_RANDOM_BYTES: Final = 5


def valid_uuid(uuid: str) -> bool:
    """True when ``uuid`` is a usable X-Uuid: ``[a-z0-9]+``, at most 46 characters."""
    return len(uuid) <= MAX_UUID_LENGTH and UUID_RE.fullmatch(uuid) is not None


@dataclass(frozen=True)
class AddressSigner:
    """Makes and checks tagged addresses with one secret."""

    secret: bytes

    def tag(self, kind: Kind, uuid: str) -> str:
        """The tag of ``uuid`` for addresses of ``kind``."""
        digest = hmac.new(self.secret, f"{kind}\x00{uuid}".encode(), hashlib.sha256).digest()
        return base64.b32encode(digest[:7]).decode().lower()[:TAG_LENGTH]

    def return_path(self, uuid: str, domain: str) -> str:
        """Envelope sender of the message ``uuid``."""
        return f"bounce-{uuid}-{self.tag('bounce', uuid)}@{domain}"

    def unsubscribe_address(self, uuid: str, domain: str) -> str:
        """``mailto:`` unsubscribe address of the message ``uuid``."""
        return f"unsub-{uuid}-{self.tag('unsub', uuid)}@{domain}"

    def unsubscribe_token(self, uuid: str) -> str:
        """Token of the https one-click unsubscribe URL."""
        return f"{uuid}-{self.tag('unsub', uuid)}"

    def parse_address(self, address: str) -> tuple[Kind, str] | None:
        """(kind, uuid) of a genuine tagged address, else None (forged, foreign or malformed).

        The domain is not checked here; callers check it against the configured
        return-path domains.
        """
        local = address.strip().strip("<>").rpartition("@")[0].lower()
        match = _LOCAL_RE.match(local)
        if match is None:
            return None
        kind: Kind = "bounce" if match.group(1) == "bounce" else "unsub"
        uuid, tag = match.group(2), match.group(3)
        if not hmac.compare_digest(tag, self.tag(kind, uuid)):
            return None
        return kind, uuid

    def parse_token(self, token: str) -> str | None:
        """The uuid of a genuine one-click unsubscribe token, else None."""
        match = _TOKEN_RE.match(token.strip().lower())
        if match is None:
            return None
        uuid, tag = match.group(1), match.group(2)
        if not hmac.compare_digest(tag, self.tag("unsub", uuid)):
            return None
        return uuid


def message_id(uuid: str, domain: str, *, now: float | None = None, nonce: bytes | None = None) -> str:
    """The Message-ID of message ``uuid``: ``<uuid.suffix@domain>``.

    The suffix is the time in milliseconds (base 36, 8 characters) followed by 40 random bits
    (base 32, 8 characters): unique across retries and processes, and 16 characters however
    short the uuid.  ``now`` and ``nonce`` fix both parts (tests, golden files).
    """
    millis = int((time.time() if now is None else now) * 1000)
    digits = ""
    while millis:
        millis, rest = divmod(millis, 36)
        digits = _B36[rest] + digits
    stamp = digits.rjust(MESSAGE_ID_TIME_CHARS, "0")
    random_part = nonce if nonce is not None else secrets.token_bytes(MESSAGE_ID_RANDOM_BYTES)
    suffix = stamp + base64.b32encode(random_part).decode("ascii").rstrip("=").lower()
    return f"<{uuid}.{suffix}@{domain}>"


def message_id_uuid(value: str, domains: Collection[str] | None = None) -> str | None:
    """The uuid of the first of our Message-IDs in ``value`` (one id or a References list), else None.

    With ``domains``, only ids on one of those (return-path) domains count.  The uuid is not
    authenticated: anyone who saw the message can quote its Message-ID.
    """
    for match in _MESSAGE_ID_RE.finditer(value):
        uuid, domain = match.group(1).lower(), match.group(3).lower().rstrip(".")
        if valid_uuid(uuid) and (domains is None or domain in domains):
            return uuid
    return None


def looks_tagged(address: str) -> bool:
    """True when ``address`` has the shape of a tagged address (genuine or not)."""
    local = address.strip().strip("<>").rpartition("@")[0].lower()
    return _LOCAL_RE.match(local) is not None


def load_secret(config: Config, client: redis.Redis) -> AddressSigner:
    """The installation's signer: configured secret, else the one kept in Redis (created once).

    Raises:
        redis.exceptions.RedisError: Redis is needed (no configured secret) and unavailable.
    """
    configured = config.customer.common_config.address_secret
    if configured is not None:
        return AddressSigner(configured.get_secret_value().encode())
    candidate = secrets.token_hex(32)
    # SET NX then GET: the first service to start wins; every other one reads its value.
    created = client.set(keys.ADDRESS_SECRET, candidate, nx=True)
    value = client.get(keys.ADDRESS_SECRET)
    if created:
        log.warning(
            "common-config.address-secret is not set; generated one and stored it in Redis (%s)",
            keys.ADDRESS_SECRET,
        )
    if not isinstance(value, bytes | str):
        raise redis.exceptions.RedisError(f"{keys.ADDRESS_SECRET} vanished after SET NX")
    return AddressSigner(value.encode() if isinstance(value, str) else value)


def wait_for_secret(
    config: Config, client: redis.Redis, stopper: Waiter, beat: Callable[[], None] | None = None
) -> AddressSigner | None:
    """:func:`load_secret`, waiting (with backoff) while Redis is unavailable; None when stopped first.

    ``beat`` is called on every attempt: waiting for Redis is not a hung loop.
    """
    attempt = 0
    while True:
        if beat is not None:
            beat()
        try:
            return load_secret(config, client)
        except redis.exceptions.RedisError as exc:
            attempt += 1
            log.warning("cannot read the address secret from Redis (%s); retry %d", exc, attempt)
        if DEPENDENCY.wait(attempt, stopper):
            return None


async def wait_for_secret_async(
    config: Config, client: redis.Redis, stop: asyncio.Event, beat: Callable[[], None] | None = None
) -> AddressSigner | None:
    """:func:`wait_for_secret` for an asyncio service (the Redis call runs in a thread)."""
    attempt = 0
    while not stop.is_set():
        if beat is not None:
            beat()
        try:
            return await asyncio.to_thread(load_secret, config, client)
        except redis.exceptions.RedisError as exc:
            attempt += 1
            log.warning("cannot read the address secret from Redis (%s); retry %d", exc, attempt)
        try:
            await asyncio.wait_for(stop.wait(), DEPENDENCY.delay(attempt))
        except TimeoutError:
            continue
    return None
