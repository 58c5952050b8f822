"""Fuzzing of the public entry points (Receiver, MxServer, HttpReceiver) on the running stack.

Malformed SMTP dialogues (random commands and arguments, binary junk, invalid UTF-8, bare LF,
overlong lines, pipelined garbage), mangled MIME and huge headers in DATA, random HTTP bodies,
content types and credentials.  Each case is bounded in time and count and seeded, so a failure
names the seed that reproduces it.  After every case the server must still answer a new
connection: no crash, no stuck session, and every reply must be a well-formed SMTP reply (or
HTTP status with a JSON error body).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import socket
import time
from collections.abc import Callable

import pytest
import requests

from devtools import testing
from devtools.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.redis, pytest.mark.slow]

SECONDS = float(os.environ.get("FUZZ_SECONDS", "12"))
REPLY = re.compile(rb"^[2-5]\d\d[ -]")
VERBS = [
    b"EHLO",
    b"HELO",
    b"MAIL FROM:",
    b"RCPT TO:",
    b"DATA",
    b"RSET",
    b"NOOP",
    b"VRFY",
    b"EXPN",
    b"AUTH PLAIN",
    b"AUTH LOGIN",
    b"AUTH CRAM-MD5",
    b"STARTTLS",
    b"BDAT 10",
    b"HELP",
    b"QUIT",
    b"XCLIENT",
]


def _junk(rng: random.Random) -> bytes:
    kind = rng.randrange(8)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    if kind == 1:
        return b"\xff\xfe\xc3(\xa0\xa1" * rng.randrange(1, 50)  # invalid UTF-8
    if kind == 2:
        return b"A" * rng.choice([1001, 5000, 70_000])  # overlong line
    if kind == 3:
        return b"<" + b"@" * rng.randrange(1, 50) + b">"
    if kind == 4:
        return b"<" + rng.choice([b"a@b", b"", b"x@" + b"d." * 200 + b"test", b"\x00@\x00"]) + b">"
    if kind == 5:
        return b" SIZE=" + str(rng.choice([-1, 0, 10**12, 10**30])).encode() + b" BODY=8BITMIME SMTPUTF8"
    if kind == 6:
        return "ünïcødé@exämple.test".encode()
    return b""


def _mime(rng: random.Random) -> bytes:
    uuid = f"fz{rng.randrange(10**9)}"
    headers = [
        f"From: news@{testing.SENDER_DOMAIN}".encode(),
        b"To: " + rng.choice([b"a@dest.test", b"", b"undisclosed-recipients:;", b"\xff\xfe@\xc3"]),
        b"X-Uuid: " + rng.choice([uuid.encode(), b"UPPER", b"", b"a" * 100, b"\xc3\xa9"]),
        b"Content-Type: multipart/mixed; boundary=" + rng.choice([b'"b"', b"", b'"' + b"x" * 500 + b'"']),
        b"Subject: " + rng.choice([b"=?utf-8?b?////?=", b"\xff" * 30, b"x" * rng.choice([10, 20_000])]),
    ]
    if rng.random() < 0.2:
        headers.append(b"X-Huge: " + b"y" * rng.choice([100_000, 1_000_000]))  # a huge header
    if rng.random() < 0.3:
        headers.append(b"Folded: a\r\n\tb\r\n \r\n c")
    rng.shuffle(headers)
    body = rng.choice(
        [
            b"--b\r\nContent-Type: text/html\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!notbase64\r\n--b--",
            b"--b\r\n\r\n--b\r\n--b\r\n",
            bytes(rng.randrange(256) for _ in range(500)).replace(b"\r\n.", b"\r\n.."),
            b"",
        ]
    )
    return b"\r\n".join(headers) + b"\r\n\r\n" + body + b"\r\n"


def _read_reply(sock: socket.socket) -> list[bytes]:
    """One (possibly multi-line) reply; every line must be well formed."""
    data = b""
    deadline = time.monotonic() + 15
    while True:
        if time.monotonic() > deadline:
            raise AssertionError(f"no complete reply within 15 s; got {data[:200]!r}")
        chunk = sock.recv(65536)
        if not chunk:
            return [data] if data else []
        data += chunk
        lines = data.split(b"\r\n")
        complete = [line for line in lines[:-1]]
        if complete and re.match(rb"^\d{3} ", complete[-1]):
            for line in complete:
                assert REPLY.match(line), f"malformed reply line {line[:120]!r}"
            return complete


def _session(host: str, port: int, rng: random.Random) -> None:
    # The server may end the session (e.g. "502 5.5.1 Too many unrecognized commands").
    with contextlib.suppress(ConnectionResetError, BrokenPipeError):
        _dialogue(host, port, rng)


def _dialogue(host: str, port: int, rng: random.Random) -> None:
    with socket.create_connection((host, port), timeout=15) as sock:
        banner = _read_reply(sock)
        assert banner and banner[0].startswith(b"220"), banner
        for _ in range(rng.randrange(1, 12)):
            choice = rng.random()
            if choice < 0.15:
                sock.sendall(b"DATA\r\n")
                reply = _read_reply(sock)
                if reply and reply[-1].startswith(b"354"):
                    sock.sendall(_mime(rng).replace(b"\r\n.", b"\r\n..") + b".\r\n")
                    reply = _read_reply(sock)
            elif choice < 0.25:  # pipelined junk
                sock.sendall(b"\r\n".join(rng.choice(VERBS) + _junk(rng) for _ in range(5)) + b"\r\n")
                reply = _read_reply(sock)
            else:
                ending = rng.choice([b"\r\n", b"\r\n", b"\n"])
                sock.sendall(rng.choice(VERBS) + rng.choice([b" ", b""]) + _junk(rng) + ending)
                reply = _read_reply(sock)
            if not reply:
                return  # the server closed the session: allowed (e.g. 421 or too many errors)
            if reply[-1][:3] in (b"221", b"421") or b"goodbye" in reply[-1].lower():
                return
            if reply[-1][:3] == b"220" and b"TLS" in reply[-1].upper():
                return  # STARTTLS accepted; a TLS handshake is out of this fuzzer's scope


def _alive(host: str, port: int) -> None:
    with socket.create_connection((host, port), timeout=10) as sock:
        assert _read_reply(sock)[0].startswith(b"220")
        sock.sendall(b"NOOP\r\n")
        assert _read_reply(sock)[-1].startswith(b"250")


def _fuzz(target: Callable[[random.Random], None], alive: Callable[[], None]) -> int:
    seed = int(os.environ.get("FUZZ_SEED", random.randrange(10**6)))
    deadline = time.monotonic() + SECONDS
    cases = 0
    while time.monotonic() < deadline and cases < 2000:
        rng = random.Random(seed + cases)
        try:
            target(rng)
            alive()
        except (AssertionError, OSError) as exc:
            raise AssertionError(f"case {cases} (FUZZ_SEED={seed + cases}): {exc!r}") from exc
        cases += 1
    return cases


@pytest.mark.parametrize("service", ["receiver", "mxserver"])
def test_smtp_fuzz_never_crashes_or_hangs(stack: Stack, service: str) -> None:
    port = stack.ports[service]
    cases = _fuzz(lambda rng: _session("127.0.0.1", port, rng), lambda: _alive("127.0.0.1", port))
    assert cases >= 20
    assert stack.procs[service].poll() is None, f"{service} died"


def test_http_fuzz_gets_clear_answers(stack: Stack) -> None:
    url = f"http://127.0.0.1:{stack.ports['httpreceiver']}/v1/mail/send"
    good_auth = (testing.RECEIVER_USER, testing.RECEIVER_PASSWORD)

    def case(rng: random.Random) -> None:
        headers = {
            "Content-Type": rng.choice(
                [
                    "message/rfc822",
                    "application/octet-stream",
                    "text/plain",
                    "application/json",
                    "message/rfc822; charset=\xff",
                ]
            )
        }
        if rng.random() < 0.2:
            headers["Idempotency-Key"] = rng.choice(["k" * 300, "!!", "ok-key-1"])
        auth = rng.choice([good_auth, good_auth, ("nobody", "x"), None])
        body = _mime(rng) if rng.random() < 0.8 else _junk(rng)
        reply = requests.post(url, data=body, headers=headers, auth=auth, timeout=15)
        assert reply.status_code in (200, 400, 401, 409, 413, 415, 422, 429), (reply.status_code, reply.text[:300])
        if reply.status_code != 200:
            assert reply.headers["Content-Type"].startswith("application/json")
            assert reply.json().get("error")

    def alive() -> None:
        assert requests.get(f"http://127.0.0.1:{stack.ports['httpreceiver-metrics']}/healthz", timeout=5).ok

    assert _fuzz(case, alive) >= 20
    assert stack.procs["httpreceiver"].poll() is None
