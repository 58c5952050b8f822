"""Who is calling ``POST /v1/mail/send``.

HTTP Basic against ``httpreceiver.auth-logins``, or a bearer key from ``httpreceiver.api-keys``.

Passwords and keys may be stored plain or as ``pbkdf2_sha256$…`` hashes (:mod:`common.passwords`,
shared with Receiver).  A hash costs a fraction of a second to check, so credentials that
verified are remembered in this process, keyed by an HMAC of what was given under a
per-process random key (the secret itself is never kept): :meth:`Authenticator.known`.  The
caller (:mod:`httpreceiver.intake`) asks the login guard before every check.

Constant time: an unknown user name is checked against a dummy hash as costly as the dearest
configured one (:func:`common.passwords.dummy_for`), so a wrong name and a wrong password take
the same time; every bearer key is compared, whichever matches.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from pydantic import SecretStr

from common import passwords
from common.config import AuthLogin

#: Remembered successful checks per process (cleared when full).
_CACHE_SIZE: Final = 4096


@dataclass(frozen=True)
class Credentials:
    """What an ``Authorization`` header offers: an account (None for a bearer key) and a secret."""

    account: str | None
    secret: str


class Authenticator:
    """Checks credentials; returns the caller's name or None."""

    def __init__(self, logins: Sequence[AuthLogin], api_keys: Sequence[SecretStr]) -> None:
        self._logins = {login.username: login.password.get_secret_value() for login in logins}
        self._keys = [key.get_secret_value() for key in api_keys]
        self._dummy = passwords.dummy_for(self._logins.values())
        self._pepper = secrets.token_bytes(32)
        self._verified: dict[bytes, str] = {}

    @property
    def accepts_bearer(self) -> bool:
        """True when API keys are configured."""
        return bool(self._keys)

    def challenge(self) -> str:
        """The ``WWW-Authenticate`` value of a 401 answer."""
        basic = 'Basic realm="inboxbooster-mailer", charset="UTF-8"'
        return basic + (', Bearer realm="inboxbooster-mailer"' if self._keys else "")

    def parse(self, header: str | None) -> Credentials | None:
        """The credentials of an ``Authorization`` value; None when absent or malformed."""
        if not header:
            return None
        scheme, _, value = header.strip().partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer" and self._keys:
            return Credentials(None, value.strip())
        if scheme != "basic":
            return None
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            return None
        username, sep, password = decoded.partition(":")
        return Credentials(username, password) if sep else None

    def authenticate(self, header: str | None) -> str | None:
        """The caller's name for an ``Authorization`` value, without any login guard (tools, tests)."""
        credentials = self.parse(header)
        if credentials is None:
            return None
        return self.known(credentials) or self.verify(credentials)

    def known(self, credentials: Credentials) -> str | None:
        """The caller's name when exactly these credentials verified before (no password check)."""
        return self._verified.get(self._fingerprint(credentials))

    def verify(self, credentials: Credentials) -> str | None:
        """The full check: the caller's name (user name, or ``apikey-<digest>``), else None."""
        if credentials.account is None:
            name = self._bearer(credentials.secret)
        else:
            stored = self._logins.get(credentials.account)
            # Unknown name: the same work as a wrong password (no timing oracle for names).
            ok = passwords.verify(self._dummy if stored is None else stored, credentials.secret)
            name = credentials.account if ok and stored is not None else None
        if name is not None:
            if len(self._verified) >= _CACHE_SIZE:
                self._verified.clear()
            self._verified[self._fingerprint(credentials)] = name
        return name

    def _bearer(self, token: str) -> str | None:
        found: str | None = None
        for stored in self._keys:  # every key is compared: the time does not tell which one matched
            if passwords.verify(stored, token) and found is None:
                found = "apikey-" + hashlib.sha256(stored.encode()).hexdigest()[:12]
        return found

    def _fingerprint(self, credentials: Credentials) -> bytes:
        who = "\x00bearer" if credentials.account is None else credentials.account
        text = who + "\x00" + credentials.secret
        return hmac.digest(self._pepper, text.encode("utf-8", "surrogatepass"), "sha256")
