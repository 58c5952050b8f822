"""A running MxServer (its own process, the ``mxserver`` console script) and a real Redis.

The records of what was sent are written the way the Transformer writes them
(:func:`common.binding.record_write`), tagged values are made with the installation's secret,
and "customer events" are the entries MxServer writes to the event stream (BackData posts them).
Tests write mail as an attacker would: through SMTP, from loopback addresses.
"""

from __future__ import annotations

import signal
import smtplib
import subprocess
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis

from common import binding
from common.addressing import AddressSigner
from common.events import decode_event
from devtools import testing
from devtools.servers import RedisProcess, free_port, port_open, wait_until

SECRET = "security-test-secret-0123456789abcdef"
SIGNER = AddressSigner(SECRET.encode())
DOMAIN = testing.RETURN_PATH_DOMAIN
FBL = f"fbl@{DOMAIN}"
POSTMASTER = f"postmaster@{DOMAIN}"
EVENT_QUEUE = "EVENT_QUEUE"


class Mx:
    """The MxServer process under attack."""

    def __init__(self, directory: Path, redis_port: int, **mxserver: Any) -> None:
        self.ports = {"mxserver": free_port(), "mxserver-metrics": free_port()}
        customer = testing.customer_config(directory, redis_port=redis_port, ports=self.ports)
        customer["common-config"]["address-secret"] = SECRET
        customer["mxserver"].update(mxserver)
        self.eml_dir = Path(customer["mxserver"]["eml-directory"])
        self.global_path, self.customer_path = testing.write_configs(directory / "configs", customer)
        self.log = (directory / "mxserver.log").open("wb")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return self.ports["mxserver"]

    def start(self) -> Mx:
        argv = testing.service_command("mxserver", self.global_path, self.customer_path)
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        wait_until(lambda: port_open("127.0.0.1", self.port), 60, what="mxserver listening")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` with ``labels`` on the MX's /metrics."""
        url = f"http://127.0.0.1:{self.ports['mxserver-metrics']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        wanted = [f'{k}="{v}"' for k, v in labels.items()]
        total = 0.0
        for line in text.splitlines():
            sample = line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " ")
            if sample and all(w in line for w in wanted):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def send(self, rcpts: list[str], data: bytes, *, source: str = "127.0.0.1") -> tuple[int, bytes]:
        """One transaction from ``source``; the reply to DATA (or to the first refused RCPT)."""
        with smtplib.SMTP(local_hostname="attacker.test", timeout=30, source_address=(source, 0)) as client:
            client.connect("127.0.0.1", self.port)
            client.ehlo()
            client.mail("<>")
            for rcpt in rcpts:
                code, text = client.rcpt(rcpt)
                if code != 250:
                    return code, text
            return client.data(data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))


@pytest.fixture(scope="package")
def mx(redis_server: RedisProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mx]:
    """One MxServer process for the package (limits small enough to test in seconds)."""
    running = Mx(
        tmp_path_factory.mktemp("security-mx"),
        redis_server.port,
        **{"max-session-seconds": 4, "idle-timeout-seconds": 3, "classify-timeout-seconds": 5},
    ).start()
    yield running
    running.stop()


@pytest.fixture
def r(redis_client: redis.Redis) -> redis.Redis:
    """The flushed test Redis (the MX keeps working across the flush: its secret is configured)."""
    return redis_client


def record(client: redis.Redis, sent: Mapping[str, Iterable[str]]) -> None:
    """Write the Transformer's records (``IB:sent:<uuid>``) for uuid -> recipients."""
    pipe = client.pipeline(transaction=True)
    for uuid, recipients in sent.items():
        binding.record_write(uuid, recipients, "campaign-7", testing.SENDER_DOMAIN, 3600).write(pipe)
    pipe.execute()


def events(client: redis.Redis) -> list[dict[str, Any]]:
    """Every customer event the MX wrote."""
    rows: Any = client.xrange(EVENT_QUEUE)
    return [decode_event(fields) for _, fields in rows]


def return_path(uuid: str, recipient: str) -> str:
    return SIGNER.return_path(uuid, recipient, DOMAIN)


def unsub_address(uuid: str, recipient: str) -> str:
    return SIGNER.unsubscribe_address(uuid, recipient, DOMAIN)


def message_id(uuid: str, recipient: str) -> str:
    return SIGNER.message_id(uuid, recipient, DOMAIN)


def token(uuid: str, recipient: str) -> str:
    return SIGNER.unsubscribe_token(uuid, recipient)
