"""BackData fixtures: a real webhook endpoint on loopback and BackData running in a thread."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry

from backdata.service import BackData
from common.config import Config
from common.events import Event
from common.lifecycle import Stopper
from common.queue import Queues, QueueSettings
from common.service import Context
from devtools.webhook import WebhookReceiver

QUEUE = "EVENT_QUEUE"

#: Fast retries for tests (the defaults wait seconds to minutes).
FAST = {"max-backoff-seconds": 0.05, "batch-max-wait-ms": 20, "timeout-seconds": 2}


@dataclass
class Running:
    """BackData running in a thread of the test process."""

    service: BackData
    stopper: Stopper
    registry: CollectorRegistry
    thread: threading.Thread
    errors: list[BaseException] = field(default_factory=list)

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels or None)
        return 0.0 if value is None else value

    def stop(self, timeout_s: float = 15) -> None:
        self.stopper.stop()
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "BackData did not stop"
        assert not self.errors, self.errors


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    """The customer's endpoint (answers 200 until told otherwise)."""
    with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture
def event_queues(redis_client: redis.Redis) -> Queues:
    return Queues(redis_client, QueueSettings(max_length=0))


@pytest.fixture
def backdata_config(make_config, webhook: WebhookReceiver) -> Callable[..., Config]:
    """Config with the backdata section overridden (post-url = the test endpoint by default)."""

    def make(global_override: dict[str, Any] | None = None, **section: Any) -> Config:
        override = {"post-url": webhook.url, **FAST, **{k.replace("_", "-"): v for k, v in section.items()}}
        config: Config = make_config({"backdata": override}, global_override, service="backdata")
        return config

    return make


@pytest.fixture
def start_backdata(redis_client: redis.Redis, backdata_config) -> Iterator[Callable[..., Running]]:
    """Factory: start BackData in a thread with the given backdata settings; stopped at teardown."""
    started: list[Running] = []

    def start(config: Config | None = None, **section: Any) -> Running:
        config = config or backdata_config(**section)
        context = Context.create(config)
        stopper, registry = context.stopper, context.registry
        service = BackData(context, block_ms=200)
        running = Running(service, stopper, registry, threading.Thread(target=lambda: None))

        def run() -> None:
            try:
                service.run()
            except BaseException as exc:
                running.errors.append(exc)
                raise

        running.thread = threading.Thread(target=run, name="backdata", daemon=True)
        running.thread.start()
        started.append(running)
        return running

    yield start
    for running in started:
        if running.thread.is_alive():
            running.stop()


class Helpers:
    """Event helpers for the tests (conftest modules cannot be imported with importlib mode)."""

    queue = QUEUE

    def __init__(self, queues: Queues) -> None:
        self.queues = queues

    @staticmethod
    def events(n: int, kind: str = "delivered", prefix: str = "u", **fields: Any) -> list[Event]:
        """``n`` events with distinct uuids and recipients."""
        return [
            Event(kind, f"{prefix}{i}", recipient=f"rcpt{i}@example.com", **fields)  # type: ignore[arg-type]
            for i in range(n)
        ]

    def enqueue(self, events: list[Event]) -> set[str]:
        """Put events on the event queue; returns their event ids."""
        self.queues.enqueue_many(QUEUE, [e.to_fields() for e in events], limit=False)
        return {e.event_id for e in events}

    @staticmethod
    def received_ids(receiver: WebhookReceiver) -> set[str]:
        return {e["event_id"] for e in receiver.events}

    @staticmethod
    def batch_sizes(receiver: WebhookReceiver) -> list[int]:
        return [len(json.loads(r.body)) for r in receiver.requests]


@pytest.fixture
def bd(event_queues: Queues) -> Helpers:
    return Helpers(event_queues)
