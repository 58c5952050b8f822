"""common.passwords (shared with Receiver) and HttpReceiver's Authorization header parsing."""

from __future__ import annotations

import base64
import hashlib

import pytest
from pydantic import SecretStr

from common import passwords
from common.config import AuthLogin
from httpreceiver.auth import Authenticator


def test_hash_round_trip_and_django_format() -> None:
    stored = passwords.hash_password("pässword", iterations=1000, salt="abc")
    algorithm, iterations, salt, digest = stored.split("$")
    assert (algorithm, iterations, salt) == ("pbkdf2_sha256", "1000", "abc")
    # Django's PBKDF2PasswordHasher: base64 of PBKDF2-HMAC-SHA256(password, salt as text).
    expected = hashlib.pbkdf2_hmac("sha256", "pässword".encode(), b"abc", 1000)
    assert base64.b64decode(digest) == expected
    assert passwords.verify(stored, "pässword")
    assert not passwords.verify(stored, "password")
    assert passwords.hash_password("x", iterations=1000) != passwords.hash_password("x", iterations=1000)


@pytest.mark.parametrize(
    ("stored", "given", "ok"),
    [
        ("plain", "plain", True),
        ("plain", "plain ", False),
        ("plain", "", False),
        ("", "", True),
        ("pbkdf2_sha256$x$salt$AAAA", "anything", False),
        ("pbkdf2_sha256$1000$salt$not-base64!", "anything", False),
        ("pbkdf2_sha256$0$salt$AAAA", "anything", False),
        ("pbkdf2_sha256$1000$$AAAA", "anything", False),
        ("pbkdf2_sha256$1000$salt", "anything", False),
        ("pbkdf2_sha256$99999999999$salt$AAAA", "anything", False),
    ],
)
def test_verify_table(stored: str, given: str, ok: bool) -> None:
    assert passwords.verify(stored, given) is ok


def test_hash_password_cli_refuses_bad_salt() -> None:
    with pytest.raises(ValueError, match="salt"):
        passwords.hash_password("x", salt="a$b")


def test_authenticator_names_the_caller() -> None:
    auth = Authenticator(
        [
            AuthLogin(username="u", password=SecretStr("p")),
            AuthLogin(username="h", password=SecretStr(passwords.hash_password("hp", iterations=1000))),
        ],
        [SecretStr("k1")],
    )

    def basic(user: str, password: str) -> str:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    assert auth.authenticate(basic("u", "p")) == "u"
    assert auth.authenticate(basic("u", "p:with:colons")) is None
    assert auth.authenticate(basic("h", "hp")) == "h"
    assert auth.authenticate(basic("h", "hp")) == "h"  # cached verification
    assert auth.authenticate(basic("h", "wrong")) is None
    bearer = auth.authenticate("Bearer k1")
    assert bearer is not None and bearer.startswith("apikey-") and "k1" not in bearer
    assert auth.authenticate("Bearer k2") is None
    assert auth.authenticate("  basic " + basic("u", "p").split()[1]) == "u"
    assert auth.authenticate("") is None
    assert auth.authenticate("Basic") is None
    assert "Bearer" in auth.challenge()
    assert "Bearer" not in Authenticator([], []).challenge()
