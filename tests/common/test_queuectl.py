"""mailer-queue: queue stats, dead letters and replay from the command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from common import queuectl
from common.config import Config
from common.queue import Consumer, Queues

pytestmark = pytest.mark.redis


def _args(config: Config, *rest: str) -> list[str]:
    return ["--global-config-file", str(config.global_path), "--customer-config-file", str(config.customer_path), *rest]


def test_stats_dead_and_replay(make_config, queues: Queues, capsys: pytest.CaptureFixture[str]) -> None:
    config = make_config()
    queues.enqueue("EVENT_QUEUE", {"data": "{}"})
    consumer = Consumer(queues, ["EVENT_QUEUE"], "backdata", "c", block_ms=50)
    consumer.setup()
    [entry] = consumer.read()
    consumer.dead_letter([(entry, "webhook refused it for 3 days", [])])

    assert queuectl.main(_args(config, "stats")) == 0
    out = capsys.readouterr().out
    assert "EVENT_QUEUE" in out and "IB-MAIL-QUEUE-P0" in out
    assert queuectl.main(_args(config, "dead", "EVENT_QUEUE")) == 0
    assert "webhook refused it for 3 days" in capsys.readouterr().out
    assert queuectl.main(_args(config, "replay", "EVENT_QUEUE")) == 0
    assert "replayed 1 entries" in capsys.readouterr().out
    assert queues.length("EVENT_QUEUE") == 1


def test_redis_down_is_a_clear_error(make_config, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = make_config({"common-config": {"redis": {"port": 1}}, "redis": {"reliable-queue": None}})
    assert queuectl.main(_args(config, "stats")) == 1
    assert "Redis unavailable" in capsys.readouterr().err
