"""Who is calling ``POST /v1/mail/send``.

HTTP Basic against ``httpreceiver.auth-logins``, or a bearer key from ``httpreceiver.api-keys``.

Passwords and keys may be stored plain or as ``pbkdf2_sha256$…`` hashes (:mod:`common.passwords`,
shared with Receiver).  A hash costs a fraction of a second to check, so a successful check is
remembered in this process, keyed by an HMAC of the given secret under a per-process random
key (the secret itself is never kept).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from typing import Final

from pydantic import SecretStr

from common import passwords
from common.config import AuthLogin

#: Remembered successful hash checks per process (cleared when full).
_CACHE_SIZE: Final = 4096


class Authenticator:
    """Checks an ``Authorization`` header; returns the caller's name or None."""

    def __init__(self, logins: Sequence[AuthLogin], api_keys: Sequence[SecretStr]) -> None:
        self._logins = {login.username: login.password.get_secret_value() for login in logins}
        self._keys = [key.get_secret_value() for key in api_keys]
        self._pepper = secrets.token_bytes(32)
        self._verified: set[tuple[str, bytes]] = set()

    @property
    def accepts_bearer(self) -> bool:
        """True when API keys are configured."""
        return bool(self._keys)

    def challenge(self) -> str:
        """The ``WWW-Authenticate`` value of a 401 answer."""
        basic = 'Basic realm="inboxbooster-mailer", charset="UTF-8"'
        return basic + (', Bearer realm="inboxbooster-mailer"' if self._keys else "")

    def authenticate(self, header: str | None) -> str | None:
        """The caller's name (user name, or ``apikey-<digest>`` for a bearer key), else None."""
        if not header:
            return None
        scheme, _, credentials = header.strip().partition(" ")
        scheme = scheme.lower()
        if scheme == "basic":
            return self._basic(credentials.strip())
        if scheme == "bearer" and self._keys:
            return self._bearer(credentials.strip())
        return None

    def _basic(self, credentials: str) -> str | None:
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            return None
        username, sep, password = decoded.partition(":")
        if not sep:
            return None
        stored = self._logins.get(username)
        if stored is None:
            return None
        return username if self._check(username, stored, password) else None

    def _bearer(self, token: str) -> str | None:
        found: str | None = None
        for stored in self._keys:  # every key is compared: the time does not tell which one matched
            if self._check("\x00apikey", stored, token) and found is None:
                found = "apikey-" + hashlib.sha256(stored.encode()).hexdigest()[:12]
        return found

    def _check(self, who: str, stored: str, given: str) -> bool:
        if not passwords.is_hashed(stored):
            return passwords.verify(stored, given)
        mark = (who, hmac.new(self._pepper, (stored + "\x00" + given).encode(), hashlib.sha256).digest())
        if mark in self._verified:
            return True
        if not passwords.verify(stored, given):
            return False
        if len(self._verified) >= _CACHE_SIZE:
            self._verified.clear()
        self._verified.add(mark)
        return True
