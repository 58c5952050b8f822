"""Fixtures every test tier shares: a real redis-server, a fresh client, config files.

Redis is started once per session on a free loopback port with AOF (``appendfsync always``,
as in production) and flushed before each test that uses it.  A missing ``redis-server`` is an
error, never a skip: CI installs it (``.ci/run``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Imported at collection on purpose: hypothesis' pytest plugin imports it lazily at the end of the
# run, and on CPython 3.11.7 that late import fails ("AST constructor recursion depth mismatch")
# once a test has run an event loop in a thread.
import hypothesis  # noqa: F401
import pytest
import redis

from common.config import Config, load_config
from common.queue import Queues, QueueSettings
from devtools import testing
from devtools.servers import RedisProcess


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A private redis-server for the whole session."""
    server = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: RedisProcess) -> Iterator[redis.Redis]:
    """A client of the session's Redis, flushed before the test."""
    client = redis.Redis(host="127.0.0.1", port=redis_server.port)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def queue_settings() -> QueueSettings:
    """Small, fast queue settings for tests."""
    return QueueSettings(max_length=1000, max_deliveries=3, claim_idle_ms=500, batch_size=10, priority_share=4)


@pytest.fixture
def queues(redis_client: redis.Redis, queue_settings: QueueSettings) -> Queues:
    """Producer/admin handle on the test Redis."""
    return Queues(redis_client, queue_settings)


@pytest.fixture
def customer_dict(tmp_path: Path, redis_server: RedisProcess) -> dict[str, Any]:
    """A complete customer file (as a dict) pointing at the test Redis."""
    return testing.customer_config(tmp_path, redis_port=redis_server.port)


@pytest.fixture
def make_config(tmp_path: Path, customer_dict: dict[str, Any]):
    """Factory: write both files with overrides merged in, load them, return the Config."""

    def make(
        override: dict[str, Any] | None = None,
        global_override: dict[str, Any] | None = None,
        service: str | None = None,
    ) -> Config:
        customer = testing.merge(customer_dict, override or {})
        global_ = testing.merge(testing.global_config(), global_override or {})
        gpath, cpath = testing.write_configs(tmp_path / "configs", customer, global_)
        return load_config(gpath, cpath, service=service)

    return make


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A run that selected no test is a failure (exit 1), never pytest's silent exit 5."""
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        terminal = session.config.pluginmanager.get_plugin("terminalreporter")
        if terminal is not None:
            terminal.write_line("ERROR: no tests were collected; refusing to report success", red=True)
