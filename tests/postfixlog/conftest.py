"""Fixtures of the PostfixLog tests: a scripted SMTP sink and private Postfix instances.

Every Postfix listens on a free loopback port and, in sandbox mode, relays everything to the
test's sink; timers are short so deferred mail is retried while a test watches.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from common.config import Config
from common.events import decode_event
from common.payloads import OutboundMail
from common.service import Context
from devtools.servers import free_port, wait_until
from devtools.sink import Sink
from postfixlog.instance import PostfixInstance
from postfixlog.service import PostfixLogService

#: Short retry timers: a deferred message is retried about every second.
FAST_TIMERS: dict[str, str | int | bool] = {
    "queue_run_delay": "1s",
    "minimal_backoff_time": "1s",
    "maximal_backoff_time": "2s",
}


@pytest.fixture
def sink() -> Iterator[Sink]:
    """The scripted SMTP sink playing "the internet" (bounce*, defer*… see devtools.sink)."""
    with Sink() as running:
        yield running


@pytest.fixture
def postfix_dir() -> Iterator[Path]:
    """A short, world-traversable directory for Postfix instances (user postfix must enter it;
    pytest's tmp_path is private to root and its UNIX socket paths would be too long)."""
    path = Path(tempfile.mkdtemp(prefix="pf-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    if not os.environ.get("POSTFIXLOG_KEEP_TEST_DIRS"):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_postfix(postfix_dir: Path) -> Iterator[Callable[..., PostfixInstance]]:
    """Factory of started Postfix instances (stopped at teardown)."""
    started: list[PostfixInstance] = []

    def make(nexthop: str | None, main_cf: dict[str, Any] | None = None, name: str = "postfix") -> PostfixInstance:
        instance = PostfixInstance(
            postfix_dir / name,
            smtpd_port=free_port(),
            nexthop=nexthop,
            main_cf={**FAST_TIMERS, **(main_cf or {})},
        )
        instance.start()
        started.append(instance)
        return instance

    yield make
    for instance in started:
        instance.stop()


class RunningService:
    """A PostfixLogService running in a thread of the test process (stopped with .stop())."""

    def __init__(self, config: Config, name: str = "test-postfixlog") -> None:
        context = Context.create(config)  # what `postfixlog` builds its service from
        self.stopper, self.registry, self.health = context.stopper, context.registry, context.health
        self.service = PostfixLogService(
            config, registry=self.registry, health=self.health, stopper=self.stopper, name=name
        )
        self.status: int | None = None
        self._thread = threading.Thread(target=self._run, name="postfixlog-under-test")

    def _run(self) -> None:
        self.status = self.service.run()

    def start(self) -> RunningService:
        self._thread.start()
        wait_until(lambda: self.health.ready()[0] or not self._thread.is_alive(), 60, what="PostfixLog ready")
        assert self._thread.is_alive(), f"service exited with {self.status}"
        return self

    def stop(self, timeout_s: float = 90.0) -> int | None:
        self.stopper.stop()
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "service did not stop"
        return self.status


def outbound(uuid: str, rcpts: list[str], *, stream_id: str | None = "stream-1", body: str = "Hello") -> OutboundMail:
    """A signed-looking message as the Transformer hands it over."""
    raw = (
        "From: News <news@example.test>\r\n"
        f"To: {', '.join(rcpts)}\r\n"
        f"Subject: test {uuid}\r\n"
        "Date: Wed, 25 Nov 2026 12:00:00 +0000\r\n"
        f"Message-ID: <{uuid}@bounces.example.test>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        f"{body}\r\n.leading dot line\r\n"
    ).encode()
    return OutboundMail(
        raw=raw,
        uuid=uuid,
        mail_from=f"bounce-{uuid}-tag1@bounces.example.test",
        recipients=tuple(rcpts),
        from_domain="example.test",
        stream_id=stream_id,
        submitted_at=time.time(),
    )


def events_of(client: Any, queue: str = "EVENT_QUEUE") -> list[dict[str, Any]]:
    """Every event on the event queue, oldest first."""
    return [decode_event(fields) for _, fields in client.xrange(queue)]


@pytest.fixture
def service_config(make_config, postfix_dir: Path, sink: Sink) -> Callable[..., Config]:
    """Factory: a loaded config for PostfixLog with a fresh Postfix port, relaying to ``sink``."""

    def make(
        main_cf: dict[str, Any] | None = None,
        nexthop: str | None = None,
        customer: dict[str, Any] | None = None,
        **section: Any,
    ) -> Config:
        port = free_port()
        override = {
            **(customer or {}),
            "postfixlog": {
                "postfix": {"port": port},
                "string-replacer": {
                    "main-cf": {**FAST_TIMERS, **(main_cf or {})},
                    "master-cf": {"smtpd-port": port},
                },
                "sandbox": {"enabled": True, "nexthop": nexthop or f"[127.0.0.1]:{sink.port}"},
                "instance-directory": str(postfix_dir / "pf"),
                **section,
            },
        }
        config: Config = make_config(override, service="postfixlog")
        return config

    return make
