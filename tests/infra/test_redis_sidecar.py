"""Redis pod sidecar: queue-depth exporter, redis-server settings, configuration check, CLI."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry
from redis.backoff import NoBackoff
from redis.retry import Retry

from common import keys
from common.config import Config
from common.config.globalfile import GlobalConfig
from common.errors import ConfigError
from common.lifecycle import stop_process
from common.queue import Consumer, Queues, QueueSettings
from common.redisha import quote
from devtools import testing
from devtools.servers import RedisProcess, free_port
from redis_sidecar import topology
from redis_sidecar.check import run_checks
from redis_sidecar.exporter import RedisMetrics
from redis_sidecar.server import container_memory_limit, is_loopback, runtime_settings

PodConfig = Callable[..., Config]


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in registry.collect() for s in family.samples}


@pytest.mark.redis
def test_exporter_reports_the_original_queue_gauges_and_per_queue_details(queues: Queues) -> None:
    # The four original names keep their meaning (entries not yet through that stage); pending,
    # dead letters and the oldest entry's age come per queue.
    queues.enqueue_many("IB-MAIL-QUEUE-P0", [{"payload": "a"}] * 3)
    queues.enqueue_many("IB-MAIL-QUEUE-P1", [{"payload": "b"}] * 5)
    queues.enqueue_many("INCOMING-TO-POSTFIX", [{"payload": "c"}] * 2)
    consumer = Consumer(queues, ["IB-MAIL-QUEUE-P1"], keys.GROUP_TRANSFORMER, "t-0", batch_size=2, block_ms=50)
    consumer.setup()
    batch = consumer.read()
    consumer.dead_letter([(batch[0], "bad", [])])
    registry = CollectorRegistry()
    RedisMetrics(queues, GlobalConfig(), registry)
    values = _samples(registry)
    assert values[("primary_queue_messages", ())] == 3
    assert values[("default_queue_messages", ())] == 4
    assert values[("event_queue_messages", ())] == 0
    assert values[("queue_to_postfix_messages", ())] == 2
    assert values[("mailer_redis_queue_messages", (("queue", "IB-MAIL-QUEUE-P1"),))] == 4
    assert values[("mailer_redis_queue_pending_messages", (("queue", "IB-MAIL-QUEUE-P1"),))] == 1
    assert values[("mailer_redis_queue_dead_letter_messages", (("queue", "IB-MAIL-QUEUE-P1"),))] == 1
    assert values[("mailer_redis_queue_dead_letter_messages", (("queue", "IB-MAIL-QUEUE-P0"),))] == 0
    age = values[("mailer_redis_queue_oldest_message_age_seconds", (("queue", "IB-MAIL-QUEUE-P0"),))]
    assert 0 <= age < 60
    assert values[("mailer_redis_queue_oldest_message_age_seconds", (("queue", "EVENT_QUEUE"),))] == 0
    # Redis' own health is the standard exporter's (redis_up, memory, clients): never exported twice.
    assert not [name for name, _ in values if name.startswith("redis_")]


@pytest.mark.redis
def test_exporter_uses_the_configured_queue_names(queues: Queues) -> None:
    cfg = GlobalConfig.model_validate({"backdata": {"queue-name": "EVENTS-2"}})
    queues.enqueue_many("EVENTS-2", [{"event": "x"}] * 7)
    registry = CollectorRegistry()
    RedisMetrics(queues, cfg, registry)
    assert _samples(registry)[("event_queue_messages", ())] == 7


def test_exporter_reports_redis_down_without_stale_queue_values() -> None:
    # The original exported 0 (an empty-looking queue) when Redis was unreachable.
    client = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    registry = CollectorRegistry()
    RedisMetrics(Queues(client, QueueSettings()), GlobalConfig(), registry)
    assert _samples(registry) == {}  # nothing rather than zeros (memory_usage_percent is the service's registry's)


@pytest.mark.redis
def test_oldest_age_follows_the_entry_id(queues: Queues) -> None:
    old_ms = int((time.time() - 600) * 1000)
    queues.redis.xadd("INCOMING-TO-POSTFIX", {"payload": "x"}, id=f"{old_ms}-0")
    registry = CollectorRegistry()
    RedisMetrics(queues, GlobalConfig(), registry)
    age = _samples(registry)[("mailer_redis_queue_oldest_message_age_seconds", (("queue", "INCOMING-TO-POSTFIX"),))]
    assert 599 <= age < 620


@pytest.mark.parametrize(
    ("bind", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.1 -::1", True),
        ("localhost", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("* -::*", False),
        ("127.0.0.1 10.0.0.5", False),
        ("redis.example", False),
    ],
)
def test_is_loopback(bind: str, loopback: bool) -> None:
    assert is_loopback(bind) is loopback


def test_quote_survives_redis_conf_parsing() -> None:
    assert quote('a b"c\\d') == '"a b\\"c\\\\d"'
    assert quote("tab\there\n") == '"tab\\x09here\\x0a"'


def test_runtime_settings_refuse_a_public_redis_without_password(pod_config: PodConfig) -> None:
    config = pod_config(password=None, bind={"inet-interface": "0.0.0.0", "inet-port": 6379})
    with pytest.raises(ConfigError) as err:
        runtime_settings(config, None)
    assert err.value.problems == [
        f"{config.customer_path}: common-config.redis.password: required when Redis listens on '0.0.0.0'; "
        "e.g. ${file:/secrets/redis-password} from a Secret"
    ]


def test_runtime_settings(pod_config: PodConfig) -> None:
    config = pod_config(appendfsync="everysec")
    settings = runtime_settings(config, 4 * 1024**3)
    assert settings["appendonly"] == "yes"
    assert settings["appendfsync"] == "everysec"
    assert settings["maxmemory"] == str(3 * 1024**3)  # 75% of the container limit
    assert settings["requirepass"] == '"pa ss\\"word\\\\with spaces"'
    assert settings["appenddirname"] == "appendonlydir"
    assert "maxmemory" not in runtime_settings(pod_config(), None)
    assert runtime_settings(pod_config(maxmemory="2GB"), 4 * 1024**3)["maxmemory"] == "2gb"
    loopback = pod_config(password=None, bind={"inet-interface": "127.0.0.1", "inet-port": 6379})
    assert "requirepass" not in runtime_settings(loopback, None)


def test_maxmemory_must_be_a_redis_size(pod_config: PodConfig) -> None:
    with pytest.raises(ConfigError, match=r"redis\.maxmemory: .*'lots' is not a Redis memory size"):
        pod_config(maxmemory="lots")


@pytest.mark.parametrize(
    ("content", "limit"), [("2147483648\n", 2147483648), ("max\n", None), ("9223372036854771712", None)]
)
def test_container_memory_limit(tmp_path: Path, content: str, limit: int | None) -> None:
    path = tmp_path / "memory.max"
    path.write_text(content)
    assert container_memory_limit((tmp_path / "absent", path)) == limit


def test_check_offline_reports_problems_and_warnings(pod_config: PodConfig) -> None:
    config = pod_config(password=None, bind={"inet-interface": "0.0.0.0", "inet-port": 6379}, appendfsync="no")
    findings = run_checks(config, None, live=False)
    levels = [(f.level, f.text.split(":")[0]) for f in findings]
    assert levels[0] == ("problem", str(config.customer_path))
    texts = " | ".join(f.text for f in findings)
    assert "common-config.object-storage is not configured" in texts
    assert "appendfsync is no: a crash can lose acknowledged mail" in texts


@pytest.mark.redis
def test_check_live_against_the_running_server(pod_config: PodConfig, redis_server: Any) -> None:
    # The test Redis runs with AOF and noeviction but without maxmemory: a warning, not a problem.
    config = pod_config(
        password=None, **{"reliable-queue": {"redis": {"hostname": "127.0.0.1", "port": redis_server.port}}}
    )
    findings = run_checks(config, None, live=True)
    assert [f.level for f in findings if f.level == "problem"] == []
    assert any("maxmemory is 0" in f.text for f in findings)


def _cli(config: Config, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        testing.service_command("redis_sidecar", config.global_path, config.customer_path, *args),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow
def test_cli_check_config_and_check(pod_config: PodConfig) -> None:
    config = pod_config()
    assert _cli(config, "--check-config").returncode == 0
    offline = _cli(config, "check", "--offline")
    assert offline.returncode == 0, offline.stdout
    assert "warning  common-config.object-storage is not configured" in offline.stdout
    bad = pod_config(password=None, bind={"inet-interface": "0.0.0.0", "inet-port": 6379})
    result = _cli(bad, "check", "--offline")
    assert result.returncode == 1
    assert result.stdout.startswith("problem ")
    assert _cli(config).returncode == 2  # a COMMAND is required


@pytest.mark.slow
def test_cli_backup_without_object_storage_is_a_clear_error(pod_config: PodConfig) -> None:
    result = _cli(pod_config(), "backup")
    assert result.returncode == 2
    assert result.stderr.strip().endswith("common-config.object-storage is not configured")


@pytest.mark.slow
def test_cli_server_refuses_public_redis_without_password(pod_config: PodConfig) -> None:
    result = _cli(pod_config(password=None, bind={"inet-interface": "0.0.0.0", "inet-port": free_port()}), "server")
    assert result.returncode == 2
    assert "common-config.redis.password: required when Redis listens on '0.0.0.0'" in result.stderr


def test_a_pod_announces_the_name_the_shared_configuration_gives_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # One ConfigMap for every pod of the StatefulSet: redis-1 finds itself in redis.replication.nodes.
    nodes = [("redis-0.redis-nodes", 6379), ("redis-1.redis-nodes", 6379), ("10.0.0.9", 6379)]
    monkeypatch.setattr(socket, "gethostname", lambda: "redis-1")
    assert topology.announced(None, 6379, nodes) == ("redis-1.redis-nodes", 6379)
    assert topology.announced("redis-1.other", 6379, nodes) == ("redis-1.other", 6379)
    monkeypatch.setattr(socket, "getfqdn", lambda: "redis-7.redis-nodes.mail.svc.cluster.local")
    monkeypatch.setattr(socket, "gethostname", lambda: "redis-7")
    assert topology.announced(None, 6379, nodes) == ("redis-7.redis-nodes.mail.svc.cluster.local", 6379)
    assert topology.same_node(("redis-1.redis-nodes", 6379), ("redis-1.redis-nodes.mail.svc", 6379))
    assert not topology.same_node(("redis-1.redis-nodes", 6379), ("redis-1.redis-nodes", 6380))
    assert not topology.same_node(("redis-1.a", 6379), ("redis-2.a", 6379))
    assert not topology.same_node(("10.0.0.1", 6379), ("10.0.0.2", 6379))


@pytest.mark.redis
def test_redis_writing_its_initial_aof_is_asked_again_and_stops_cleanly(tmp_path: Path) -> None:
    # A replica that has just synced writes its first AOF and meanwhile answers one SIGTERM with
    # "Writing initial AOF, can't exit." and keeps running; the launcher repeats the request, so
    # Redis exits cleanly (status 0, AOF complete) as soon as it is done -- not killed at the deadline.
    server = RedisProcess(tmp_path / "redis", extra={"appendonly": "no"}).start()
    assert server.proc is not None
    client = redis.Redis(host="127.0.0.1", port=server.port)
    client.mset({f"k{i}": "v" for i in range(20)})
    client.config_set("rdb-key-save-delay", 100_000)  # µs per key: the initial AOF takes ~2 s
    client.config_set("appendonly", "yes")
    client.close()
    status = stop_process(server.proc, timeout_s=60, what="redis-server", repeat_every_s=0.2)
    log = (tmp_path / "redis" / "redis.log").read_text()
    assert "Writing initial AOF, can't exit." in log  # the first request really was refused
    assert status == 0
    assert "ready to exit, bye bye" in log
    server.extra = {}  # restart with the AOF on: it holds every key
    server.start()
    try:
        assert redis.Redis(host="127.0.0.1", port=server.port).dbsize() == 20
    finally:
        server.stop()
