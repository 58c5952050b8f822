"""Per-recipient return paths, unsubscribe addresses, one-click tokens and Message-IDs, tagged.

Every recipient copy of a message gets its own tagged values, bound by HMAC to (uuid, recipient)
so that nobody can make the platform report a bounce, spam report or unsubscribe for a message
they did not receive, nor for another recipient of it.  For uuid ``U``, recipient ``R`` and
return-path domain ``D`` the Transformer writes:

* envelope sender (bounce address): ``bounce-U-T@D`` with ``T = tag("bounce", U, R)``;
* unsubscribe address (``List-Unsubscribe`` mailto): ``unsub-U-T@D`` with ``T = tag("unsub", U, R)``;
* one-click unsubscribe token (https ``List-Unsubscribe``): ``U-T``, the same unsub tag;
* ``Message-ID: <U.T.S@D>`` with ``T = tag("msgid", U, R)`` and ``S`` a time-and-random suffix
  (unique, and never short whatever the uuid).

``T`` is 10 characters: the first 50 bits of HMAC-SHA256(secret, kind, U, lower-case R) in
lower-case base32.  The recipient is not in the address; :mod:`common.binding` finds it from
the platform's record of what it sent (or from an address the report names, when its HMAC
matches).  The uuid is ``[a-z0-9]+`` of at most :data:`MAX_UUID_LENGTH` characters, so the
longest local part, ``bounce-`` + 46 + ``-`` + 10, is RFC 5321's 64 octets.

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

#: What a tag protects: the return path, the unsubscribe address and token, the Message-ID.
Kind = Literal["bounce", "unsub", "msgid"]
KINDS: Final[tuple[Kind, ...]] = ("bounce", "unsub", "msgid")

TAG_LENGTH: Final = 10
MAX_UUID_LENGTH: Final = 46  # 64 - len("bounce-") - len("-") - TAG_LENGTH
UUID_RE: Final = re.compile(r"[a-z0-9]+")
#: The Message-ID's unique suffix: 6 bytes of time (ms) and 4 random bytes, in 16 base32 characters.
SUFFIX_RANDOM_BYTES: Final = 4

_LOCAL_RE: Final = re.compile(r"^(bounce|unsub)-([a-z0-9]{1,46})-([a-z2-7]{10})$")
_TOKEN_RE: Final = re.compile(r"^([a-z0-9]{1,46})-([a-z2-7]{10})$")
_MSGID_RE: Final = re.compile(r"^<?\s*([a-z0-9]{1,46})\.([a-z2-7]{10})\.([a-z2-7]{6,32})@([^<>@\s]+?)\s*>?$")
#: ``<uuid[.anything]@domain>``: any of our Message-IDs, tagged or from before tags existed.
_ANY_MESSAGE_ID_RE: Final = re.compile(r"<\s*([a-z0-9]{1,46})((?:\.[a-z0-9-]+)*)@([a-z0-9.-]{1,253})\s*>", re.I)


def valid_uuid(uuid: str) -> bool:
    """True when ``uuid`` is a usable X-Uuid: ``[a-z0-9]+``, at most 46 characters."""
    return len(uuid) <= MAX_UUID_LENGTH and UUID_RE.fullmatch(uuid) is not None


def _canonical(recipient: str) -> bytes:
    return recipient.strip().strip("<>").lower().encode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class Tagged:
    """A tagged value found somewhere (an address, a token, a Message-ID): its shape only.

    Whether the tag is genuine, and for which recipient, is :func:`common.binding.resolve`'s
    question.  ``domain`` is the address' or Message-ID's domain (None for a token).
    """

    kind: Kind
    uuid: str
    tag: str
    domain: str | None = None


def parse_address(address: str) -> Tagged | None:
    """The tagged parts of ``bounce-U-T@D`` / ``unsub-U-T@D`` (any case), else None."""
    local, _, domain = address.strip().strip("<>").rpartition("@")
    match = _LOCAL_RE.match(local.lower())
    if match is None:
        return None
    kind: Kind = "bounce" if match.group(1) == "bounce" else "unsub"
    return Tagged(kind, match.group(2), match.group(3), domain.lower().rstrip(".") or None)


def parse_token(token: str) -> Tagged | None:
    """The tagged parts of a one-click token ``U-T``, else None."""
    match = _TOKEN_RE.match(token.strip().lower())
    if match is None:
        return None
    return Tagged("unsub", match.group(1), match.group(2))


def parse_message_id(value: str) -> Tagged | None:
    """The tagged parts of one of our Message-IDs ``<U.T.S@D>``, else None."""
    match = _MSGID_RE.match(value.strip().lower())
    if match is None:
        return None
    return Tagged("msgid", match.group(1), match.group(2), match.group(4).rstrip("."))


def message_id_uuid(value: str, domains: Collection[str] | None = None) -> str | None:
    """The uuid of the first of our Message-IDs in ``value`` (one id or a References list), else None.

    With ``domains``, only ids on one of those (return-path) domains count.  The uuid is NOT
    authenticated (anyone who saw the message can quote or invent a Message-ID): tools and
    benchmarks use this; attributing a report needs :func:`parse_message_id` and the tag.
    """
    for match in _ANY_MESSAGE_ID_RE.finditer(value):
        uuid, domain = match.group(1).lower(), match.group(3).lower().rstrip(".")
        if valid_uuid(uuid) and (domains is None or domain in domains):
            return uuid
    return None


def looks_tagged(address: str) -> bool:
    """True when ``address`` has the shape of a tagged address (genuine or not)."""
    return parse_address(address) is not None


@dataclass(frozen=True)
class AddressSigner:
    """Makes and checks tags with one secret."""

    secret: bytes

    def tag(self, kind: Kind, uuid: str, recipient: str) -> str:
        """The tag of the copy of ``uuid`` sent to ``recipient``, for values of ``kind``."""
        message = kind.encode() + b"\x00" + uuid.encode() + b"\x00" + _canonical(recipient)
        digest = hmac.digest(self.secret, message, "sha256")  # one-shot: OpenSSL's HMAC, no Python object
        return base64.b32encode(digest[:7]).decode().lower()[:TAG_LENGTH]

    def verify(self, kind: Kind, uuid: str, tag: str, recipient: str) -> bool:
        """True when ``tag`` is the tag of (``kind``, ``uuid``, ``recipient``) (constant time)."""
        return hmac.compare_digest(tag.lower().encode(), self.tag(kind, uuid, recipient).encode())

    def return_path(self, uuid: str, recipient: str, domain: str) -> str:
        """Envelope sender of the copy of ``uuid`` sent to ``recipient``."""
        return f"bounce-{uuid}-{self.tag('bounce', uuid, recipient)}@{domain}"

    def unsubscribe_address(self, uuid: str, recipient: str, domain: str) -> str:
        """``mailto:`` unsubscribe address of that copy."""
        return f"unsub-{uuid}-{self.tag('unsub', uuid, recipient)}@{domain}"

    def unsubscribe_token(self, uuid: str, recipient: str) -> str:
        """Token of that copy's https one-click unsubscribe URL."""
        return f"{uuid}-{self.tag('unsub', uuid, recipient)}"

    def message_id(
        self, uuid: str, recipient: str, domain: str, *, now: float | None = None, nonce: bytes | None = None
    ) -> str:
        """``<U.T.S@D>``: unique (time and 32 random bits, or ``nonce``, in ``S``), tagged, never short."""
        millis = int((time.time() if now is None else now) * 1000)
        random = secrets.token_bytes(SUFFIX_RANDOM_BYTES) if nonce is None else nonce[:SUFFIX_RANDOM_BYTES]
        raw = millis.to_bytes(6, "big") + random.ljust(SUFFIX_RANDOM_BYTES, b"\0")
        suffix = base64.b32encode(raw).decode().lower()  # 80 bits: 16 characters, no padding
        return f"<{uuid}.{self.tag('msgid', uuid, recipient)}.{suffix}@{domain}>"


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
