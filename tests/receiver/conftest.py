"""Run the real Receiver (console script entry point, own process) against the test Redis.

:func:`start_receiver` writes both config files, starts ``python -m receiver`` and waits for
its 220 greeting; :class:`RunningReceiver` offers smtplib clients (plain, STARTTLS+AUTH,
implicit TLS), the queued entries and the scraped metrics.  The ``receiver`` fixture is one
instance per test module (starting one takes about a second); tests that stop or reconfigure
it start their own.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from common.passwords import hash_password
from common.payloads import SubmittedMail
from devtools import testing
from devtools.servers import RedisProcess, free_port, wait_until

USER = testing.RECEIVER_USER
PASSWORD = testing.RECEIVER_PASSWORD
#: A second account whose password is stored as a PBKDF2 hash (cheap iteration count for tests).
HASHED_USER = "hashed"
HASHED_PASSWORD = "s3cret-hashed"
P0, P1 = "IB-MAIL-QUEUE-P0", "IB-MAIL-QUEUE-P1"
CLIENT_NAME = "client.test"
TRUSTED_SOURCE = "127.0.0.2"
DATA = Path(__file__).parents[1] / "data" / "receiver"


def message(
    *,
    uuid: str = "abc123",
    sender: str = f"app@{testing.SENDER_DOMAIN}",
    to: str = "someone@dest.test",
    extra: str = "",
    body: bytes = b"Hello.\r\n",
) -> bytes:
    """A valid submission with CRLF line ends."""
    head = f"From: App <{sender}>\r\nTo: {to}\r\nSubject: test\r\nX-Uuid: {uuid}\r\n{extra}\r\n"
    return head.encode() + body


def client_tls() -> ssl.SSLContext:
    """Client context that accepts the Receiver's self-signed certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@dataclass
class RunningReceiver:
    """A Receiver process tree started by a test."""

    proc: subprocess.Popen[bytes]
    port: int
    tls_port: int
    metrics_port: int
    log_path: Path
    redis_port: int
    directory: Path
    extra: dict[str, Any] = field(default_factory=dict)

    # -- clients -----------------------------------------------------------------------------

    def smtp(self, source: str | None = None, timeout: float = 20) -> smtplib.SMTP:
        """A connected plain client (EHLO not sent yet)."""
        src = (source, 0) if source else None
        return smtplib.SMTP("127.0.0.1", self.port, local_hostname=CLIENT_NAME, timeout=timeout, source_address=src)

    def authenticated(self, user: str = USER, password: str = PASSWORD, source: str | None = None) -> smtplib.SMTP:
        """A client after EHLO, STARTTLS, EHLO and AUTH."""
        client = self.smtp(source)
        client.ehlo()
        client.starttls(context=client_tls())
        client.ehlo()
        client.login(user, password)
        return client

    def implicit_tls(self) -> smtplib.SMTP_SSL:
        """A client on the implicit-TLS port."""
        return smtplib.SMTP_SSL(
            "127.0.0.1", self.tls_port, local_hostname=CLIENT_NAME, context=client_tls(), timeout=20
        )

    def greets(self) -> bool:
        """True when the SMTP port answers with 220."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                return sock.recv(128).startswith(b"220")
        except OSError:
            return False

    # -- observation ---------------------------------------------------------------------------

    def queued(self, queue: str = P1) -> list[SubmittedMail]:
        """Entries of a mail queue, oldest first."""
        client = redis.Redis(port=self.redis_port)
        try:
            rows: Any = client.xrange(queue)
            return [SubmittedMail.from_fields(fields) for _, fields in rows]
        finally:
            client.close()

    def metrics(self) -> dict[str, float]:
        """Scraped samples, ``name{labels}`` -> value."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def metric(self, name: str) -> float:
        """One sample (0 when absent)."""
        return self.metrics().get(name, 0.0)

    def http(self, path: str) -> tuple[int, str]:
        """GET on the metrics/health server."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=15) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def log(self) -> str:
        """Everything the process tree wrote to stderr so far."""
        return self.log_path.read_text(errors="replace")

    # -- life cycle ----------------------------------------------------------------------------

    def signal(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Send a signal to the main process."""
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        """Exit status, waiting up to ``timeout``."""
        return self.proc.wait(timeout)

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def receiver_config(directory: Path, redis_port: int, override: dict[str, Any] | None = None) -> dict[str, Any]:
    """A customer file for one test Receiver: loopback ports, fast lockout, small size limit."""
    customer = testing.customer_config(directory, redis_port=redis_port)
    customer["receiver"] = testing.merge(
        customer["receiver"],
        {
            "bind": {"inet-interface": "127.0.0.1", "inet-port": free_port()},
            "implicit-tls-port": free_port(),
            "prometheus": {"inet-interface": "127.0.0.1", "inet-port": free_port()},
            "auth-logins": [
                {"username": USER, "password": PASSWORD},
                {"username": HASHED_USER, "password": hash_password(HASHED_PASSWORD, iterations=1000)},
            ],
            "trusted-networks": [f"{TRUSTED_SOURCE}/32"],
            "max-message-size": 100_000,
            "processes": 1,
            "auth-lockout": {"max-failures": 3, "window-seconds": 60, "lockout-seconds": 2, "delay-seconds": 0.05},
            "shutdown-grace-seconds": 10,
        },
    )
    return testing.merge(customer, override or {})


def start_receiver(
    directory: Path,
    redis_port: int,
    override: dict[str, Any] | None = None,
    global_override: dict[str, Any] | None = None,
    *,
    wait: bool = True,
    env: dict[str, str] | None = None,
) -> RunningReceiver:
    """Write the configs into ``directory`` and start the Receiver."""
    directory.mkdir(parents=True, exist_ok=True)
    customer = receiver_config(directory, redis_port, override)
    global_ = testing.merge(testing.global_config(), global_override or {})
    gpath, cpath = testing.write_configs(directory, customer, global_)
    log_path = directory / "receiver.log"
    command = testing.service_command("receiver", gpath, cpath)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=log, env={**os.environ, **(env or {})})
    section = customer["receiver"]
    running = RunningReceiver(
        proc=proc,
        port=section["bind"]["inet-port"],
        tls_port=section["implicit-tls-port"],
        metrics_port=section["prometheus"]["inet-port"],
        log_path=log_path,
        redis_port=redis_port,
        directory=directory,
    )
    if wait:
        try:
            wait_until(lambda: proc.poll() is not None or running.greets(), timeout_s=30, what="the 220 greeting")
        except TimeoutError:
            running.stop()
            raise
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode}:\n{running.log()}")
    return running


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisProcess) -> Iterator[RunningReceiver]:
    """One Receiver (one process) for the tests of a module."""
    running = start_receiver(tmp_path_factory.mktemp("receiver"), redis_server.port)
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture
def fresh(receiver: RunningReceiver, redis_client: redis.Redis) -> RunningReceiver:
    """The module's Receiver with an empty Redis (queues, lockouts)."""
    return receiver


def reply_of(exc: smtplib.SMTPResponseException) -> str:
    """``"<code> <text>"`` of an SMTP error."""
    text = exc.smtp_error.decode() if isinstance(exc.smtp_error, bytes) else str(exc.smtp_error)
    return f"{exc.smtp_code} {text}"


def enhanced(text: bytes | str) -> str:
    """The enhanced status code at the start of a reply text."""
    value = text.decode() if isinstance(text, bytes) else text
    match = re.match(r"\d\.\d{1,3}\.\d{1,3}", value)
    return match.group(0) if match else ""
