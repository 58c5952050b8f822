"""Pure parts of the Receiver: DATA framing, address parsing, accounts, trusted networks."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import random
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from common import passwords
from common.authguard import client_key
from common.config import AuthLogin
from common.smtpserver import Sessions
from receiver.accounts import Accounts, check_logins, hash_problem
from receiver.app import process_count
from receiver.protocol import SubmissionSMTP, is_trusted, read_data, unstuff


def _stuff(content: bytes) -> bytes:
    """What a client sends for ``content`` (RFC 5321 4.5.2), without the terminator."""
    return (b"\r\n" + content).replace(b"\r\n.", b"\r\n..")[2:]


async def _read(chunks: list[bytes], limit: int | None = None) -> tuple[bytes | None, bytes]:
    reader = asyncio.StreamReader(limit=1001)
    for chunk in chunks:
        reader.feed_data(chunk)
    reader.feed_eof()
    return await read_data(reader, limit), await reader.read()


def _split(data: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 8)))) if len(data) > 1 else []
    return [data[i:j] for i, j in zip([0, *cuts], [*cuts, len(data)], strict=True)]


lines = st.lists(
    st.one_of(
        st.sampled_from([b"", b".", b"..", b".x", b"\r", b"a\rb", b"x.", b"\xff\xfe"]),
        st.binary(max_size=40).map(lambda b: b.replace(b"\r\n", b"")),
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(lines=lines, seed=st.integers(0, 2**32))
def test_read_data_frames_any_content_in_any_chunking(lines: list[bytes], seed: int) -> None:
    # Whatever the content and however TCP splits it, DATA ends at the first CRLF.CRLF,
    # unstuffing restores the content, and the next command stays unread.
    content = b"".join(line.replace(b"\n", b"") + b"\r\n" for line in lines)
    wire = _stuff(content) + b".\r\nQUIT\r\n"
    got, rest = asyncio.run(_read(_split(wire, random.Random(seed))))
    assert got is not None and unstuff(got) == content
    assert rest == b"QUIT\r\n"


@pytest.mark.parametrize(
    ("wire", "content"),
    [
        (b".\r\n", b""),
        (b"\r\n.\r\n", b"\r\n"),
        (b"a\r\n.\r\n", b"a\r\n"),
        (b"..\r\n.\r\n", b".\r\n"),
        (b"a\r\n..b\r\n.\r\n", b"a\r\n.b\r\n"),
        (b"x\r\r\n.\r\n", b"x\r\r\n"),
    ],
)
def test_read_data_edge_cases(wire: bytes, content: bytes) -> None:
    got, rest = asyncio.run(_read([wire + b"NOOP\r\n"]))
    assert got is not None and unstuff(got) == content and rest == b"NOOP\r\n"


def test_read_data_over_the_limit_reads_to_the_end_and_keeps_nothing() -> None:
    got, rest = asyncio.run(_read([b"x" * 3000 + b"\r\n", b"y" * 3000 + b"\r\n.\r\nRSET\r\n"], limit=1000))
    assert got is None and rest == b"RSET\r\n"


@pytest.mark.parametrize(
    "arg",
    [
        "<a@b.test>",
        "<a@b.test> SIZE=100 BODY=8BITMIME",
        "  <first.last+tag@sub.example.test>",
        "a@b.test",
        '<"x y"@b.test>',
        "<>",
        "<@route.test:a@b.test>",
        "<jörg@bücher.test> SMTPUTF8",
        "<a@[127.0.0.1]>",
        "<a b@c.test>",
        "<a@b@c.test>",
        "<unterminated@b.test",
    ],
)
def test_fast_address_parsing_agrees_with_aiosmtpd(arg: str) -> None:
    async def both() -> tuple[object, object]:
        protocol = SubmissionSMTP(
            object(), sessions=Sessions(), trusted_networks=[], max_auth_failures=3, hostname="x.test"
        )
        address, rest = protocol._getaddr(arg)
        original = SMTP._getaddr(protocol, arg)
        return (address, (rest or "").strip()), (original[0], (original[1] or "").strip())

    ours, theirs = asyncio.run(both())
    assert ours == theirs


def test_protocol_finds_every_hook_despite_the_short_dir() -> None:
    async def build() -> SubmissionSMTP:
        from receiver.handler import SubmissionHandler

        handler = SubmissionHandler.__new__(SubmissionHandler)
        return SubmissionSMTP(handler, sessions=Sessions(), trusted_networks=[], max_auth_failures=3, hostname="x")

    protocol = asyncio.run(build())
    assert set(protocol._smtp_methods) >= {"EHLO", "HELO", "MAIL", "RCPT", "DATA", "AUTH", "STARTTLS", "QUIT", "RSET"}
    assert {name: m.is_builtin for name, m in protocol._auth_methods.items()} == {"PLAIN": False, "LOGIN": False}
    assert set(protocol._handle_hooks) == {"MAIL", "RCPT", "DATA", "exception"}


def _login(name: str, password: str) -> AuthLogin:
    return AuthLogin(username=name, password=SecretStr(password))


def test_accounts_plain_hashed_unknown_and_cache() -> None:
    accounts = Accounts([_login("plain", "pw1"), _login("hashed", passwords.hash_password("pw2", iterations=1000))])

    async def checks() -> list[bool]:
        return [
            await accounts.check(b"plain", b"pw1"),
            await accounts.check(b"plain", b"pw1 "),
            await accounts.check(b"hashed", b"pw2"),
            await accounts.check(b"hashed", b"pw2"),  # cached
            await accounts.check(b"hashed", b"pw1"),
            await accounts.check(b"nobody", b"pw1"),
            await accounts.check(b"plain", b"\xff"),
        ]

    assert asyncio.run(checks()) == [True, False, True, True, False, False, False]
    assert len(accounts) == 2


@pytest.mark.parametrize(
    ("stored", "problem"),
    [
        (passwords.hash_password("x", iterations=1000), None),
        ("pbkdf2_sha256$1000$salt", "expected pbkdf2_sha256$<iterations>$<salt>$<hash base64>"),
        ("pbkdf2_sha256$many$salt$AAAA", "iterations must be a positive number"),
        ("pbkdf2_sha256$1000$$" + "A" * 44, "the salt is empty"),
        ("pbkdf2_sha256$1000$salt$***", "the hash is not base64"),
        ("pbkdf2_sha256$1000$salt$AAAA", "the hash is not 32 bytes long"),
    ],
)
def test_hash_problems(stored: str, problem: str | None) -> None:
    assert hash_problem(stored) == problem


def test_check_logins_names_the_entry() -> None:
    logins = [_login("a", "plain"), _login("b", "pbkdf2_sha256$1000$salt$AAAA")]
    assert check_logins(logins) == ["receiver.auth-logins[1].password: malformed hash: the hash is not 32 bytes long"]


@pytest.mark.parametrize(
    ("peer", "trusted"),
    [("10.1.2.3", True), ("10.2.0.1", False), ("fd00::5", True), ("::1", False), ("not-an-ip", False), ("", False)],
)
def test_trusted_networks(peer: str, trusted: bool) -> None:
    networks = [ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("fd00::/8")]
    assert is_trusted(peer, networks) is trusted


def test_client_key_normalises_mapped_addresses() -> None:
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_key("2001:0db8:0000::1") == "2001:db8::1"
    assert client_key("192.0.2.7") == "192.0.2.7"


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "150000 100000\n"}, 2),
        ({"cpu.max": "50000 100000\n"}, 1),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),
        ({}, None),
    ],
)
def test_process_count_follows_the_container_cpu_limit(
    tmp_path: Path, files: dict[str, str], expected: int | None
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    cpus = len(os.sched_getaffinity(0))
    assert process_count(0, tmp_path) == (min(cpus, expected) if expected else cpus)
    assert process_count(3, tmp_path) == 3
