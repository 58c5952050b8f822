"""Fixtures for MxServer: a real server on a free loopback port, in a thread with its own loop."""

from __future__ import annotations

import asyncio
import smtplib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from common.addressing import AddressSigner
from common.config import Config
from common.metrics import Health
from devtools.testing import RETURN_PATH_DOMAIN
from mxserver.metrics import MxMetrics
from mxserver.server import MxServer

SIGNER = AddressSigner(b"test-address-secret-0123456789abcdef")
REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "tests/data/mx"


def bounce_address(uuid: str) -> str:
    return SIGNER.return_path(uuid, RETURN_PATH_DOMAIN)


def unsub_address(uuid: str) -> str:
    return SIGNER.unsubscribe_address(uuid, RETURN_PATH_DOMAIN)


def crlf(data: bytes) -> bytes:
    """SMTP line endings (smtplib sends bytes as they are)."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


class RunningMx:
    """An MxServer running in a background thread (start/stop from test code)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.metrics = MxMetrics(self.registry)
        self.health = Health()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="mx-test-loop", daemon=True)
        self.server: MxServer | None = None

    def start(self) -> RunningMx:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(20)
        return self

    async def _start(self) -> None:
        self.server = MxServer(self.config, self.metrics, self.health)
        await self.server.start()

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    @property
    def eml_dir(self) -> Path:
        section = self.config.customer.mxserver
        assert section is not None
        return section.eml_directory

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.close(drain_s=5), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def smtp(self) -> smtplib.SMTP:
        client = smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.test", timeout=10)
        client.ehlo()
        return client

    def send(self, rcpts: list[str], data: bytes, mail_from: str = "<>") -> tuple[int, bytes]:
        """One transaction; returns the reply to DATA (or to the first refused RCPT)."""
        with self.smtp() as client:
            code, text = client.mail(mail_from)
            assert code == 250, text
            for rcpt in rcpts:
                code, text = client.rcpt(rcpt)
                if code != 250:
                    return code, text
            return client.data(crlf(data))


@pytest.fixture
def mx_config(make_config: Callable[..., Config], tmp_path: Path) -> Callable[..., Config]:
    """Factory: the test config with ``mxserver`` overrides (eml directory under tmp_path)."""

    def make(override: dict[str, Any] | None = None) -> Config:
        mx: dict[str, Any] = {"eml-directory": str(tmp_path / "eml")}
        mx.update(override or {})
        return make_config({"mxserver": mx}, service="mxserver")

    return make


@pytest.fixture
def start_mx() -> Iterator[Callable[[Config], RunningMx]]:
    """Factory: start an MxServer for a config; every one started is stopped at the end."""
    running: list[RunningMx] = []

    def start(config: Config) -> RunningMx:
        mx = RunningMx(config).start()
        running.append(mx)
        return mx

    yield start
    for mx in running:
        mx.stop()


@pytest.fixture
def mx(redis_client: Any, mx_config: Callable[..., Config], start_mx: Callable[[Config], RunningMx]) -> RunningMx:
    """A running MxServer with the default test config and a flushed Redis."""
    return start_mx(mx_config())
