"""mailer-queue: queue stats, dead letters, replay and purge from the command line."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from common import cli, keys, queuectl, redisreply, suppressionctl, trace
from common.config import Config
from common.queue import Consumer, Queues, QueueSettings

pytestmark = pytest.mark.redis


def _args(config: Config, *rest: str) -> list[str]:
    return ["--global-config-file", str(config.global_path), "--customer-config-file", str(config.customer_path), *rest]


def _dead_letter(queues: Queues, queue: str, reason: str, n: int = 1) -> None:
    for i in range(n):
        queues.enqueue(queue, {"data": "{}", "uuid": f"u{i}"})
    consumer = Consumer(queues, [queue], "backdata", "c", block_ms=50, batch_size=n)
    consumer.setup()
    entries = consumer.read()
    consumer.dead_letter([(entry, reason, []) for entry in entries])


def test_stats_dead_and_replay(make_config, queues: Queues, capsys: pytest.CaptureFixture[str]) -> None:
    config = make_config()
    _dead_letter(queues, "EVENT_QUEUE", "webhook refused it for 3 days")

    assert queuectl.main(_args(config, "stats")) == 0
    out = capsys.readouterr().out
    assert "EVENT_QUEUE" in out and "IB-MAIL-QUEUE-P0" in out and "bounce-manager" in out
    assert queuectl.main(_args(config, "dead", "EVENT_QUEUE")) == 0
    assert "webhook refused it for 3 days" in capsys.readouterr().out
    assert queuectl.main(_args(config, "replay", "EVENT_QUEUE")) == 0
    assert "replayed 1 dead-lettered entries of EVENT_QUEUE" in capsys.readouterr().out
    assert queues.length("EVENT_QUEUE") == 1
    [(_, fields)] = redisreply.stream_rows(queues.redis.xrange("EVENT_QUEUE"))
    assert b"replayed-at" in fields  # BackData's age limit restarts at the replay


def test_unknown_queue_is_named(make_config, capsys: pytest.CaptureFixture[str]) -> None:
    config = make_config()
    assert queuectl.main(_args(config, "dead", "NOPE")) == 2
    err = capsys.readouterr().err
    assert "unknown queue 'NOPE'" in err and "EVENT_QUEUE" in err


def test_purge_removes_only_old_dead_letters(make_config, queues: Queues, capsys: pytest.CaptureFixture[str]) -> None:
    config = make_config()
    old_id = f"{int((time.time() - 40 * 86400) * 1000)}-0"
    queues.redis.xadd(keys.dead_letter("EVENT_QUEUE"), {"dl-reason": "ancient"}, id=old_id)
    _dead_letter(queues, "EVENT_QUEUE", "recent")
    assert queuectl.main(_args(config, "purge", "EVENT_QUEUE", "--older-than", "30d")) == 0
    assert "purged 1 dead-lettered entries" in capsys.readouterr().out
    [left] = queues.dead_letters("EVENT_QUEUE")
    assert left.fields[b"dl-reason"] == b"recent"
    with pytest.raises(SystemExit):
        queuectl.main(_args(config, "purge", "EVENT_QUEUE", "--older-than", "soon"))


def test_dead_letter_streams_are_capped(queues: Queues, redis_client) -> None:
    # reliable-queue.dead-letter-max-length bounds every <queue>:dead stream (approximately, never below).
    capped = Queues(redis_client, QueueSettings(max_deliveries=3, batch_size=500, dead_letter_max_length=100))
    _dead_letter(capped, "IN", "poison", n=400)
    length = redis_client.xlen(keys.dead_letter("IN"))
    assert 100 <= length < 400


def test_configs_of_a_running_local_stack_are_found(
    make_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # In a checkout running `./mailer up`, `mailer-queue stats` needs no flags (run/configs is found
    # from any directory below the checkout), and says which files it read.
    config = make_config()
    checkout = tmp_path / "checkout"
    (checkout / "run").mkdir(parents=True)
    config.customer_path.parent.rename(checkout / "run" / "configs")
    (checkout / "sub" / "dir").mkdir(parents=True)
    monkeypatch.chdir(checkout / "sub" / "dir")
    monkeypatch.delenv(cli.CONFIG_DIR_ENV, raising=False)
    assert queuectl.main(["stats"]) == 0
    err = capsys.readouterr().err
    assert str(checkout / "run" / "configs" / "inboxbooster-mailer-global.yaml") in err
    monkeypatch.setenv(cli.CONFIG_DIR_ENV, str(tmp_path / "elsewhere"))
    with pytest.raises(SystemExit) as exc:
        queuectl.main(["stats"])
    assert exc.value.code == 2
    assert str(tmp_path / "elsewhere" / "inboxbooster-mailer-global.yaml") in capsys.readouterr().err


def test_redis_down_is_a_clear_error(make_config, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = make_config({"common-config": {"redis": {"port": 1}}, "redis": {"reliable-queue": None}})
    assert queuectl.main(_args(config, "stats")) == 3
    assert "Redis unavailable" in capsys.readouterr().err


def test_trace_prints_the_timeline_or_says_the_uuid_is_unknown(
    make_config, queues: Queues, capsys: pytest.CaptureFixture[str]
) -> None:
    config = make_config()
    assert queuectl.main(_args(config, "trace", "nosuch")) == 1
    assert "no message with uuid nosuch is known" in capsys.readouterr().err
    pipe = queues.redis.pipeline()
    trace.add_to(pipe, trace.TraceSettings(), "t1", trace.entry("injected", recipient="a@dest.test", queue_id="4AB"))
    trace.add_to(pipe, trace.TraceSettings(), "t1", trace.entry("accepted", at=1, door="smtp"))
    pipe.execute()
    assert queuectl.main(_args(config, "trace", "t1")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "accepted" in lines[0] and "door=smtp" in lines[0]
    assert "injected" in lines[1] and "queue_id=4AB" in lines[1]
    assert queuectl.main(_args(config, "trace", "t1", "--json")) == 0
    assert '"queue_id": "4AB"' in capsys.readouterr().out


def test_mailer_suppressions_add_list_export_import_delete(
    make_config, queues: Queues, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = make_config()
    assert suppressionctl.main(_args(config, "add", "example.test", "A@dest.test", "--reason", "unsubscribe")) == 0
    assert "a@dest.test  unsubscribe" in capsys.readouterr().out
    assert suppressionctl.main(_args(config, "get", "example.test", "a@dest.test")) == 0
    assert "enforced" in capsys.readouterr().out
    assert suppressionctl.main(_args(config, "export", "--format", "csv")) == 0
    exported = capsys.readouterr().out
    assert exported.startswith("scope,address,reason,first,last,event_id,uuid,count\nexample.test,a@dest.test")
    assert suppressionctl.main(_args(config, "delete", "example.test", "a@dest.test")) == 0
    assert suppressionctl.main(_args(config, "get", "example.test", "a@dest.test")) == 1
    rows = tmp_path / "rows.csv"
    rows.write_text(exported + "example.test,not-an-address,manual,,,,,\n")
    assert suppressionctl.main(_args(config, "import", str(rows))) == 1  # one row rejected
    captured = capsys.readouterr()
    assert "imported 1 entries, rejected 1 rows" in captured.out and "line 3" in captured.err
    assert suppressionctl.main(_args(config, "list", "--json", "--reason", "unsubscribe")) == 0
    assert '"address": "a@dest.test"' in capsys.readouterr().out
