"""Password checks for the submission accounts of Receiver (SMTP AUTH) and HttpReceiver (Basic).

``auth-logins[].password`` (and ``httpreceiver.api-keys``) hold either the plain secret, as in
the original, or a hash in Django's format, so a config map need not carry clear text::

    pbkdf2_sha256$<iterations>$<salt>$<base64 of the 32-byte PBKDF2-HMAC-SHA256 key>

Make one with ``python -m common.passwords`` (reads the password from stdin) or
:func:`hash_password`.  Every comparison is constant-time (:func:`hmac.compare_digest`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import sys
from collections.abc import Iterable
from typing import Final

ALGORITHM: Final = "pbkdf2_sha256"
#: OWASP's 2023 recommendation for PBKDF2-HMAC-SHA256 (about 0.3 s of one core here).
DEFAULT_ITERATIONS: Final = 600_000
_MAX_ITERATIONS: Final = 10_000_000


def _bytes(text: str) -> bytes:
    # surrogatepass: a password decoded with surrogateescape (undecodable SMTP bytes) still compares.
    return text.encode("utf-8", "surrogatepass")


def is_hashed(stored: str) -> bool:
    """True when ``stored`` is in the ``pbkdf2_sha256$…`` format (well-formed or not)."""
    return stored.startswith(ALGORITHM + "$")


def hash_password(password: str, *, iterations: int = DEFAULT_ITERATIONS, salt: str | None = None) -> str:
    """Hash ``password`` for the configuration file."""
    if iterations < 1:
        raise ValueError("iterations must be positive")
    salt = salt or secrets.token_urlsafe(16)
    if "$" in salt:
        raise ValueError("the salt must not contain '$'")
    derived = hashlib.pbkdf2_hmac("sha256", _bytes(password), _bytes(salt), iterations)
    return f"{ALGORITHM}${iterations}${salt}${base64.b64encode(derived).decode()}"


def dummy_for(stored: Iterable[str]) -> str:
    """A value to check unknown user names against, as costly as the dearest configured hash.

    Checking an unknown name against it takes as long as a wrong password for a real account,
    so the time of an answer does not tell which names exist.  "" when nothing is hashed
    (plain passwords are compared in constant time and cost next to nothing either way).
    """
    iterations = 0
    for value in stored:
        parts = value.split("$")
        if is_hashed(value) and len(parts) == 4 and parts[1].isdigit():
            iterations = max(iterations, min(int(parts[1]), _MAX_ITERATIONS))
    return hash_password(secrets.token_urlsafe(16), iterations=iterations) if iterations else ""


def verify(stored: str, given: str) -> bool:
    """True when ``given`` matches ``stored`` (plain text or a ``pbkdf2_sha256$`` hash).

    A malformed hash never matches anything.
    """
    if not is_hashed(stored):
        return hmac.compare_digest(_bytes(stored), _bytes(given))
    parts = stored.split("$")
    if len(parts) != 4 or not parts[1].isdigit() or not parts[2]:
        return False
    iterations = int(parts[1])
    if not 1 <= iterations <= _MAX_ITERATIONS:
        return False
    try:
        expected = base64.b64decode(parts[3], validate=True)
    except ValueError:
        return False
    derived = hashlib.pbkdf2_hmac("sha256", _bytes(given), _bytes(parts[2]), iterations)
    return hmac.compare_digest(derived, expected)


def main() -> None:
    """Print the hash of the password read from stdin (one line)."""
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        sys.stderr.write("usage: echo -n PASSWORD | python -m common.passwords\n")
        raise SystemExit(2)
    sys.stdout.write(hash_password(password) + "\n")


if __name__ == "__main__":
    main()
