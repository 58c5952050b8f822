"""Fixtures for MxServer: a real server on a free loopback port, in a thread with its own loop.

Tagged addresses are made with the test secret (``devtools.mxcorpus.SIGNER``); records of what
was "sent" are written as the Transformer writes them (:func:`common.binding.record_write`).
"""

from __future__ import annotations

import asyncio
import smtplib
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry

from common import binding
from common import bouncerules as rules
from common.config import Config
from common.metrics import Health
from devtools import mxcorpus
from devtools.testing import RETURN_PATH_DOMAIN, SENDER_DOMAIN
from mxserver.analysis import Settings
from mxserver.classifier import Classifier
from mxserver.metrics import MxMetrics
from mxserver.server import MxServer

SIGNER = mxcorpus.SIGNER
REPO = Path(__file__).resolve().parents[2]
CORPUS = mxcorpus.CORPUS
SETTINGS = Settings(
    domains=frozenset({RETURN_PATH_DOMAIN}),
    rules=rules.shipped(),
    own_hosts=frozenset({mxcorpus.OWN_MTA}),
    abuse_addresses=frozenset({mxcorpus.FBL_ADDRESS}),
    from_domains=frozenset({SENDER_DOMAIN}),
)
CLASSIFIER = Classifier(SETTINGS, SIGNER)
#: The corpus' results by kind and by MTA family, reported at the end of the run.
CORPUS_RESULTS: dict[str, Counter[tuple[str, bool]]] = defaultdict(Counter)


def bounce_address(uuid: str, recipient: str) -> str:
    return SIGNER.return_path(uuid, recipient, RETURN_PATH_DOMAIN)


def unsub_address(uuid: str, recipient: str) -> str:
    return SIGNER.unsubscribe_address(uuid, recipient, RETURN_PATH_DOMAIN)


def message_id(uuid: str, recipient: str) -> str:
    return SIGNER.message_id(uuid, recipient, RETURN_PATH_DOMAIN)


def crlf(data: bytes) -> bytes:
    """SMTP line endings (smtplib sends bytes as they are)."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def record(client: redis.Redis, sent: Mapping[str, Iterable[str]], stream_id: str | None = "spring") -> None:
    """Write the Transformer's records (``IB:sent:<uuid>``) for uuid -> recipients."""
    pipe = client.pipeline(transaction=True)
    for uuid, recipients in sent.items():
        binding.record_write(uuid, recipients, stream_id, SENDER_DOMAIN, 3600).write(pipe)
    pipe.execute()


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
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(60)
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
        client = smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.test", timeout=30)
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
        mx: dict[str, Any] = {"eml-directory": str(tmp_path / "eml"), "classify-processes": 1}
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


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The corpus pass figures per kind/classification and per MTA family (when the corpus ran)."""
    if not CORPUS_RESULTS:
        return
    write = terminalreporter.write_line
    terminalreporter.section("MX corpus")
    for title, counts in sorted(CORPUS_RESULTS.items()):
        keys = sorted({k for k, _ in counts})
        total = sum(counts.values())
        passed = sum(n for (_, ok), n in counts.items() if ok)
        write(f"{title}: {passed}/{total} passed")
        cells = [f"{k} {counts[(k, True)]}/{counts[(k, True)] + counts[(k, False)]}" for k in keys]
        for start in range(0, len(cells), 6):
            write("    " + ", ".join(cells[start : start + 6]))
