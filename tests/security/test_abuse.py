"""The MX under abuse: idle connections, slow clients, MIME bombs -- with a bounded run time.

Against the running MxServer of this package (max-session-seconds 4, idle-timeout-seconds 3,
the default caps: 10 sessions per client address, 200 in all).  Other loopback addresses
(127.0.0.2 …) play other clients.
"""

from __future__ import annotations

import smtplib
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis

from tests.security.conftest import POSTMASTER, Mx, events, record, return_path

UUID = "5e6f7a8b9c0d1e2f3a4b"
READER = "reader@example.org"


def nested_bomb(levels: int = 1400) -> bytes:
    """About 70 KB of nested multiparts (the stdlib parser would recurse ~1400 levels deep)."""
    head = b"".join(b'Content-Type: multipart/mixed; boundary="b%d"\n\n--b%d\n' % (i, i) for i in range(levels))
    return b"From: bomb@attacker.example\nSubject: hi\nMIME-Version: 1.0\n" + head


def wide_bomb(parts: int = 4000) -> bytes:
    """Thousands of parts, each looking like a failure line."""
    body = b"".join(
        b"--b\nContent-Type: text/plain\n\nx%d@example.org 550 5.1.1 user unknown\n" % i for i in range(parts)
    )
    return (
        b'From: MAILER-DAEMON@attacker.example\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"\n\n'
        + (body + b"--b--\n")
    )


def genuine_dsn(n: int) -> bytes:
    return (
        f"From: MAILER-DAEMON@mx.example.org\nSubject: Undelivered Mail\nMessage-ID: <good-{n}@mx.example.org>\n"
        'MIME-Version: 1.0\nContent-Type: multipart/report; report-type=delivery-status; boundary="b"\n\n'
        "--b\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx.example.org\n\n"
        f"Final-Recipient: rfc822; {READER}\nAction: failed\nStatus: 5.1.1\n\n--b--\n"
    ).encode()


@contextmanager
def connections(mx: Mx, sources: list[str]) -> Iterator[list[socket.socket]]:
    opened = [socket.create_connection(("127.0.0.1", mx.port), timeout=10, source_address=(s, 0)) for s in sources]
    try:
        yield opened
    finally:
        for sock in opened:
            sock.close()


def banner(sock: socket.socket) -> bytes:
    return sock.recv(200)


@pytest.mark.slow
def test_fifty_idle_connections_lock_out_nobody_else(mx: Mx, r: redis.Redis) -> None:
    # 50 idle sessions from 50 addresses: a well-behaved client is still served (no 421).
    record(r, {UUID: [READER]})
    started = time.monotonic()
    with connections(mx, [f"127.0.0.{i}" for i in range(2, 52)]) as idle:
        assert all(banner(sock).startswith(b"220 ") for sock in idle)
        assert mx.send([return_path(UUID, READER)], genuine_dsn(1))[0] == 250
        # One address may hold at most 10 sessions: the 11th from 127.0.0.2 is told 421.
        with connections(mx, ["127.0.0.2"] * 10) as more:
            replies = [banner(sock) for sock in more]
        assert sum(reply.startswith(b"421 4.7.0") for reply in replies) == 1, replies
    assert [e["recipient"] for e in events(r)] == [READER]
    assert time.monotonic() - started < 20


@pytest.mark.slow
def test_noop_loops_and_slow_data_are_cut_in_bounded_time(mx: Mx) -> None:
    # A NOOP every half second cannot renew the session past max-session-seconds (4 s); a DATA
    # trickling one line a second is cut by the idle timeout (3 s, counted from DATA).
    started = time.monotonic()
    client = smtplib.SMTP("127.0.0.1", mx.port, local_hostname="slow.test", timeout=10)
    code = 250
    while code == 250 and time.monotonic() - started < 15:
        code = client.noop()[0]
        time.sleep(0.5)
    assert code == 421
    assert time.monotonic() - started < 8
    client.close()
    with connections(mx, ["127.0.0.3"]) as (sock,):
        sock.recv(200)
        sock.sendall(b"EHLO slow.test\r\n")
        sock.recv(1000)
        sock.sendall(f"MAIL FROM:<>\r\nRCPT TO:<{POSTMASTER}>\r\nDATA\r\n".encode())
        data_started = time.monotonic()
        answered = b""
        while b"421" not in answered and time.monotonic() - data_started < 15:
            try:
                sock.sendall(b"Subject: slow\r\n")
                sock.settimeout(1)
                answered += sock.recv(1000)
            except TimeoutError:
                continue
            except OSError:
                break
        assert b"421 4.4.2" in answered
        assert time.monotonic() - data_started < 8


def test_mime_bombs_are_kept_while_the_mx_keeps_answering(mx: Mx, r: redis.Redis) -> None:
    # Four senders send MIME bombs (70 KB of nested multiparts, thousands of parts) while a
    # well-behaved client sends genuine bounces: the bombs end in the eml store (no event, no
    # RecursionError), every genuine bounce is one event, and the well-behaved client's
    # commands are answered within 100 ms (median; never more than a second).
    record(r, {UUID: [READER]})
    kept_before = len(list(mx.eml_dir.glob("*.eml")))
    warnings_before = mx.metric("mxserver_warnings_total")
    bombs = [nested_bomb(), wide_bomb()] * 3
    replies: list[int] = []
    stop = threading.Event()

    def bomber(source: str) -> None:
        for bomb in bombs:
            if stop.is_set():
                return
            replies.append(mx.send([POSTMASTER], bomb, source=source)[0])

    threads = [threading.Thread(target=bomber, args=(f"127.0.1.{i}",)) for i in range(1, 5)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    latencies: list[float] = []
    try:
        for n in range(20):
            # One session per mail (the MX's max-session-seconds is 4 s here).
            t0 = time.perf_counter()
            with smtplib.SMTP("127.0.0.1", mx.port, local_hostname="good.test", timeout=30) as client:
                latencies.append(time.perf_counter() - t0)
                for command in (client.ehlo, lambda: client.mail("<>"), lambda: client.rcpt(return_path(UUID, READER))):
                    t0 = time.perf_counter()
                    assert command()[0] == 250
                    latencies.append(time.perf_counter() - t0)
                assert client.data(genuine_dsn(n).replace(b"\n", b"\r\n"))[0] == 250
    finally:
        for thread in threads:
            thread.join(60)
        stop.set()
    assert replies == [250] * len(bombs) * 4
    assert len(list(mx.eml_dir.glob("*.eml"))) == kept_before + len(bombs) * 4
    assert mx.metric("mxserver_warnings_total") == warnings_before
    assert [e["recipient"] for e in events(r)] == [READER] * 20
    assert statistics.median(latencies) < 0.1, sorted(latencies)[-5:]
    assert max(latencies) < 1.0, sorted(latencies)[-5:]
    assert time.monotonic() - started < 60
