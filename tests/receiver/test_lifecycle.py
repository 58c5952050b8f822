"""Temporary failures, graceful shutdown and the multi-process mode, each with its own Receiver."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis

from devtools import testing
from devtools.servers import RedisProcess, port_open, wait_until
from tests.receiver.conftest import P1, message, start_receiver

# Each test starts real processes (the service, a Redis of its own): slow, not in ./mailer test --fast.
pytestmark = [pytest.mark.redis, pytest.mark.slow]

SENDER = f"app@{testing.SENDER_DOMAIN}"


def _send(client: smtplib.SMTP, raw: bytes) -> tuple[int, bytes]:
    client.mail(SENDER)
    client.rcpt("someone@dest.test")
    return client.data(raw)


def test_redis_down_gives_451_and_the_same_message_is_accepted_later(tmp_path: Path) -> None:
    # Redis stopped -> 451 4.3.0 (the client keeps the message); Redis back -> the retry of
    # the very same message is accepted and queued once.
    redis_server = RedisProcess(tmp_path / "redis").start()
    receiver = start_receiver(tmp_path / "receiver", redis_server.port)
    try:
        raw = message(uuid="retry1")
        with receiver.authenticated() as client:
            assert _send(client, message(uuid="before1"))[0] == 250
            redis_server.stop()
            code, text = _send(client, raw)
            assert (code, text) == (451, b"4.3.0 Mail queue temporarily unavailable, try again later")
            status, body = receiver.http("/readyz")
            assert status == 503 and "redis" in body
            redis_server.start()
            wait_until(lambda: receiver.http("/readyz")[0] == 200, timeout_s=20, what="readyz after restart")
            assert _send(client, raw)[0] == 250
        assert [e.uuid for e in receiver.queued(P1)] == ["before1", "retry1"]
        assert receiver.queued(P1)[1].raw == raw
        assert receiver.metric('mailer_receiver_temporary_failures_total{reason="queue-unavailable"}') == 1
        assert receiver.stop() == 0
    finally:
        receiver.stop()
        redis_server.stop()


def test_queue_over_its_limit_gives_452_then_accepts(tmp_path: Path, redis_server: RedisProcess) -> None:
    redis_client = redis.Redis(port=redis_server.port)
    redis_client.flushall()
    receiver = start_receiver(tmp_path, redis_server.port, global_override={"reliable-queue": {"max-queue-length": 2}})
    try:
        with receiver.authenticated() as client:
            assert _send(client, message(uuid="q1"))[0] == 250
            assert _send(client, message(uuid="q2"))[0] == 250
            code, text = _send(client, message(uuid="q3"))
            assert (code, text) == (452, b"4.3.1 Mail queue is full, try again later")
            # The Transformer catches up: the queue drains, and the same message is accepted.
            redis_client.delete(P1)
            assert _send(client, message(uuid="q3"))[0] == 250
        assert [e.uuid for e in receiver.queued(P1)] == ["q3"]
        assert receiver.stop() == 0
    finally:
        receiver.stop()
        redis_client.close()


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_lets_an_open_transaction_finish(tmp_path: Path, redis_server: RedisProcess, processes: int) -> None:
    # SIGTERM in the middle of DATA: the listener closes, an idle session gets 421 at once,
    # the transaction in progress completes with 250 and is queued, then the process exits 0.
    redis.Redis(port=redis_server.port).flushall()
    receiver = start_receiver(tmp_path, redis_server.port, {"receiver": {"processes": processes}})
    try:
        busy = receiver.authenticated()
        idle = receiver.authenticated()
        busy.mail(SENDER)
        busy.rcpt("someone@dest.test")
        assert busy.docmd("DATA")[0] == 354
        raw = message(uuid="inflight1", body=b"first half\r\n")
        busy.send(raw)
        receiver.signal(signal.SIGTERM)
        # The idle session is closed with 421 4.3.2.
        assert idle.sock is not None
        idle_line = idle.sock.makefile("rb").readline()
        assert idle_line.startswith(b"421 4.3.2"), idle_line
        wait_until(lambda: not port_open("127.0.0.1", receiver.port), timeout_s=10, what="the listener to close")
        busy.send(b"second half\r\n.\r\n")
        code, text = busy.getreply()
        assert (code, text) == (250, b"2.0.0 Ok: queued as inflight1")
        started = time.monotonic()
        assert receiver.wait(30) == 0
        # Nothing else was open: the process did not wait for the 10 s grace period.
        assert time.monotonic() - started < 5
        [entry] = receiver.queued(P1)
        assert entry.raw == raw + b"second half\r\n"
        log = receiver.log()
        assert "received SIGTERM" in log and "stopped" in log
        busy.close()
        idle.close()
    finally:
        receiver.stop()


def test_shutdown_is_bounded_by_the_grace_period(tmp_path: Path, redis_server: RedisProcess) -> None:
    # A client that never finishes its DATA is cut off after shutdown-grace-seconds; exit 0.
    receiver = start_receiver(tmp_path, redis_server.port, {"receiver": {"shutdown-grace-seconds": 1}})
    try:
        stuck = receiver.authenticated()
        stuck.mail(SENDER)
        stuck.rcpt("someone@dest.test")
        assert stuck.docmd("DATA")[0] == 354
        stuck.send(b"Subject: never ends\r\n")
        receiver.signal(signal.SIGTERM)
        assert receiver.wait(20) == 0
        assert "cut 1 sessions still in a transaction" in receiver.log()
        stuck.close()
    finally:
        receiver.stop()


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


def test_several_processes_share_the_port_and_sum_their_metrics(tmp_path: Path, redis_server: RedisProcess) -> None:
    # processes: 2 -> two workers (own event loops) on one port; metrics are summed over them;
    # a worker that dies is replaced and the port keeps answering.
    redis.Redis(port=redis_server.port).flushall()
    receiver = start_receiver(tmp_path, redis_server.port, {"receiver": {"processes": 2}})
    try:
        wait_until(lambda: len(_children(receiver.proc.pid)) == 2, timeout_s=10, what="two workers")
        workers = _children(receiver.proc.pid)
        connections = []
        for _ in range(12):
            client = receiver.smtp(source="127.0.0.2")  # trusted: no AUTH needed
            client.ehlo()
            connections.append(client)
        for i, client in enumerate(connections):  # the sessions stay open while the others are sent
            assert _send(client, message(uuid=f"mp{i}"))[0] == 250
            client.quit()
        assert len(receiver.queued(P1)) == 12
        assert receiver.metric("nbr_emails_enqueued_total") == 12
        served = receiver.log().count("serving SMTP on")
        assert served == 2
        os.kill(workers[0], signal.SIGKILL)
        wait_until(
            lambda: len(_children(receiver.proc.pid)) == 2 and workers[0] not in _children(receiver.proc.pid),
            timeout_s=10,
            what="a replacement worker",
        )
        for i in range(6):
            with receiver.smtp(source="127.0.0.2") as client:
                client.ehlo()
                assert _send(client, message(uuid=f"after{i}"))[0] == 250
        assert "exited unexpectedly" in receiver.log()
        assert receiver.stop() == 0
        assert all(not _alive(pid) for pid in _children(receiver.proc.pid))
    finally:
        receiver.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_reuseport_spreads_connections_over_workers(tmp_path: Path, redis_server: RedisProcess) -> None:
    # SO_REUSEPORT: the kernel hands new connections to both workers (20 open sessions all on
    # one worker would happen with probability 2 * 2**-20).
    receiver = start_receiver(tmp_path, redis_server.port, {"receiver": {"processes": 2}})
    sockets = []
    try:
        wait_until(lambda: len(_children(receiver.proc.pid)) == 2, timeout_s=10, what="two workers")
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", receiver.port), timeout=5)
            assert sock.recv(64).startswith(b"220")
            sockets.append(sock)
        table = subprocess.run(
            ["ss", "-Htnp", "state", "established", f"( sport = :{receiver.port} )"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        owners = {int(pid) for pid in re.findall(r"pid=(\d+)", table)}
        assert owners == set(_children(receiver.proc.pid)), table
    finally:
        for sock in sockets:
            sock.close()
        receiver.stop()


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_closes_an_idle_plain_connection_with_421(
    tmp_path: Path, redis_server: RedisProcess, processes: int
) -> None:
    # A connection that never started TLS (uvloop's own transport, not asyncio's) is closed
    # with 421 4.3.2 at once, and the process does not wait for the grace period.
    receiver = start_receiver(tmp_path, redis_server.port, {"receiver": {"processes": processes}})
    try:
        with socket.create_connection(("127.0.0.1", receiver.port), timeout=10) as sock, sock.makefile("rb") as lines:
            assert lines.readline().startswith(b"220")
            sock.sendall(b"EHLO client.test\r\n")
            while not lines.readline().startswith(b"250 "):
                pass
            started = time.monotonic()
            receiver.signal(signal.SIGTERM)
            assert lines.readline().startswith(b"421 4.3.2")
            assert receiver.wait(30) == 0
            assert time.monotonic() - started < 5
    finally:
        receiver.stop()
