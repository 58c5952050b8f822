"""SMTP AUTH accounts (``receiver.auth-logins``): plain or PBKDF2-hashed passwords.

Passwords are checked with :mod:`common.passwords` (shared with HttpReceiver; constant-time,
Django's ``pbkdf2_sha256$<iterations>$<salt>$<hash base64>`` format, which
``receiver --hash-password`` prints).  Hashing costs a large fraction of a second of CPU by
design, so :meth:`Accounts.check` runs it in a thread (the event loop keeps serving other
sessions) and remembers credentials that verified -- as an HMAC under a per-process random key,
never the password -- so a client that logs in for every message pays the cost once
(:meth:`Accounts.known`; the login guard still decides whether it may log in).  An unknown user
name is checked against a dummy hash as costly as the dearest configured one, so a wrong name
and a wrong password take the same time.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Iterable
from typing import Final

from common import passwords
from common.config import AuthLogin

_CACHE_LIMIT: Final = 1024


def hash_problem(stored: str) -> str | None:
    """Why a ``pbkdf2_sha256$…`` value can never match, or None when it is well-formed."""
    parts = stored.split("$")
    if len(parts) != 4:
        return "expected pbkdf2_sha256$<iterations>$<salt>$<hash base64>"
    if not parts[1].isdigit() or int(parts[1]) < 1:
        return "iterations must be a positive number"
    if not parts[2]:
        return "the salt is empty"
    try:
        digest = base64.b64decode(parts[3], validate=True)
    except (binascii.Error, ValueError):
        return "the hash is not base64"
    if len(digest) != hashlib.sha256().digest_size:
        return "the hash is not 32 bytes long"
    return None


def check_logins(logins: Iterable[AuthLogin]) -> list[str]:
    """Problems with the configured accounts, one line each (``receiver.auth-logins[i]…``)."""
    problems = []
    for i, login in enumerate(logins):
        stored = login.password.get_secret_value()
        if passwords.is_hashed(stored) and (problem := hash_problem(stored)) is not None:
            problems.append(f"receiver.auth-logins[{i}].password: malformed hash: {problem}")
    return problems


class Accounts:
    """The configured SMTP AUTH accounts."""

    def __init__(self, logins: Iterable[AuthLogin]) -> None:
        self._stored = {login.username: login.password.get_secret_value() for login in logins}
        # Unknown users are checked against a dummy of the same cost: no timing oracle for names.
        self._dummy = passwords.dummy_for(self._stored.values())
        self._cache_key = secrets.token_bytes(32)
        self._verified: set[bytes] = set()

    def __len__(self) -> int:
        return len(self._stored)

    def _fingerprint(self, user: bytes, password: bytes) -> bytes:
        return hmac.new(self._cache_key, user + b"\0" + password, hashlib.sha256).digest()

    def known(self, user: bytes, password: bytes) -> bool:
        """True when exactly these credentials verified before in this process (no password check)."""
        return self._fingerprint(user, password) in self._verified

    async def check(self, user: bytes, password: bytes) -> bool:
        """True when ``user``/``password`` is a configured account (the full, costly check)."""
        name = user.decode("utf-8", "surrogateescape")
        given = password.decode("utf-8", "surrogateescape")
        stored = self._stored.get(name)
        if stored is None:
            await self._verify(self._dummy, given)
            return False
        if not await self._verify(stored, given):
            return False
        if len(self._verified) >= _CACHE_LIMIT:
            self._verified.clear()
        self._verified.add(self._fingerprint(user, password))
        return True

    @staticmethod
    async def _verify(stored: str, given: str) -> bool:
        if passwords.is_hashed(stored):
            return await asyncio.to_thread(passwords.verify, stored, given)
        return passwords.verify(stored, given)
