"""The Redis pods of ``deploy/ha``: data nodes that join the current primary, sentinels, the exporter.

Everything runs for real: ``redis-sidecar server`` / ``redis-sidecar sentinel`` as subprocesses
(SIGTERM as Kubernetes sends it) beside a local primary, replica and three sentinels
(:class:`devtools.redisha.LocalRedisHA`, the same settings as the pods), all on loopback.
"""

from __future__ import annotations

import contextlib
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry

from common import redisacl
from common.config import Config, load_config
from common.config.globalfile import GlobalConfig
from common.queue import Queues, QueueSettings
from devtools import testing
from devtools.redisha import MASTER_NAME, LocalRedisHA
from devtools.servers import free_port, wait_until
from redis_sidecar.exporter import RedisMetrics
from tests.infra.conftest import REDIS_CONF

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def _node_config(directory: Path, cluster: LocalRedisHA, port: int, nodes: list[str]) -> Config:
    """The customer file of a data node pod on ``port`` (its service users are the cluster's)."""
    directory.mkdir(parents=True, exist_ok=True)
    customer = testing.merge(
        testing.customer_config(directory, redis_port=port),
        {
            **testing.redis_users(("receiver",)),
            "common-config": {"redis": cluster.redis_block()},
            "redis": {
                "reliable-queue": None,
                "bind": {"inet-interface": "127.0.0.1", "inet-port": port},
                "config-file": str(REDIS_CONF),
                "data-directory": str(directory / "data"),
                "replication": {
                    "nodes": nodes,
                    "announce-hostname": "127.0.0.1",
                    "replication-password": cluster.replication.replication_password.get_secret_value(),
                    "sentinel-password": cluster.replication.sentinel_password.get_secret_value(),
                },
            },
        },
    )
    paths = testing.write_configs(directory / "configs", customer)
    return load_config(*paths, service="redis")


class Launcher:
    """``redis-sidecar <command>`` in a subprocess."""

    def __init__(self, config: Config, command: str) -> None:
        self.proc = subprocess.Popen(
            testing.service_command("redis_sidecar", config.global_path, config.customer_path, command),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"launcher exited {self.proc.returncode}: {self.proc.communicate()[1]}")
        return True

    def terminate(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, err


@contextlib.contextmanager
def launched(config: Config, command: str) -> Iterator[Launcher]:
    launcher = Launcher(config, command)
    try:
        yield launcher
    finally:
        if launcher.proc.poll() is None:
            status, err = launcher.terminate()
            assert status == 0, err


def _replication(port: int, password: str) -> dict[str, Any]:
    try:
        with contextlib.closing(redis.Redis("127.0.0.1", port, password=password, socket_timeout=1)) as client:
            info: dict[str, Any] = client.info("replication")
            return info
    except redis.exceptions.RedisError:
        return {}


def test_a_data_node_joins_the_primary_the_sentinels_name(tmp_path: Path) -> None:
    # A pod that starts (or comes back) asks the sentinels and replicates from the primary they
    # name: never a primary of its own.  It has every service's ACL user, the replication and
    # sentinel users and min-replicas-to-write, like every other node.
    cluster = LocalRedisHA(tmp_path / "ha", replicas=1)
    port = free_port()
    config = _node_config(tmp_path / "pod", cluster, port, [*cluster.replication.nodes, f"127.0.0.1:{port}"])
    cluster.users = redisacl.user_lines(config)
    with cluster:
        primary = cluster.primary_port()
        assert primary is not None
        with contextlib.closing(cluster.admin(primary)) as admin:
            admin.xadd("IB-MAIL-QUEUE-P1", {"uuid": "before"})
        with launched(config, "server") as pod:

            def joined() -> bool:
                info = _replication(port, cluster.admin_password)
                return pod.alive() and info.get("master_port") == primary and info.get("master_link_status") == "up"

            wait_until(joined, timeout_s=30, what="the new node to replicate from the primary")
            with contextlib.closing(cluster.admin(port)) as node:
                assert node.xlen("IB-MAIL-QUEUE-P1") == 1
                assert node.config_get("min-replicas-to-write") == {"min-replicas-to-write": "1"}
            receiver = config.redis_for("receiver")
            assert receiver.password is not None
            with contextlib.closing(
                redis.Redis("127.0.0.1", port, username="receiver", password=receiver.password.get_secret_value())
            ) as service:
                assert service.ping() is True
                with pytest.raises(redis.exceptions.NoPermissionError):
                    service.get("IB:backdata:anything")
            # The sentinels learn the replica from the primary.
            wait_until(lambda: int(_sentinel_master(cluster)["num-slaves"]) == 2, timeout_s=30, what="a third node")


def _sentinel_master(cluster: LocalRedisHA, port: int | None = None) -> dict[str, Any]:
    with contextlib.closing(
        redis.Redis("127.0.0.1", port or cluster.sentinel_ports[0], password=cluster.sentinel_password)
    ) as client:
        state: dict[str, Any] = client.sentinel_master(MASTER_NAME)  # type: ignore[assignment]
        return state


def test_a_new_installation_starts_the_first_node_as_primary_and_the_next_as_its_replica(tmp_path: Path) -> None:
    # No sentinel answers yet: the first of redis.replication.nodes becomes the primary, the other
    # node finds it by its ROLE and replicates from it.
    cluster = LocalRedisHA(tmp_path / "ha", replicas=1)  # only its passwords and free ports are used
    first, second = free_port(), free_port()
    nodes = [f"127.0.0.1:{first}", f"127.0.0.1:{second}"]
    config_a = _node_config(tmp_path / "a", cluster, first, nodes)
    config_b = _node_config(tmp_path / "b", cluster, second, nodes)
    with launched(config_a, "server") as a:
        wait_until(
            lambda: a.alive() and _replication(first, cluster.admin_password).get("role") == "master",
            timeout_s=30,
            what="the first node as the primary",
        )
        with launched(config_b, "server") as b:
            wait_until(
                lambda: b.alive() and _replication(second, cluster.admin_password).get("master_link_status") == "up",
                timeout_s=30,
                what="the second node as its replica",
            )
            assert _replication(second, cluster.admin_password)["master_port"] == first


def test_a_sentinel_pod_watches_the_current_primary_with_only_the_sentinel_secrets(tmp_path: Path) -> None:
    # redis-sidecar sentinel reads the sentinels' password and the data nodes' sentinel password --
    # nothing else: every other secret reference of the file points at a file that is not there.
    cluster = LocalRedisHA(tmp_path / "ha", replicas=1)
    with cluster:
        port = free_port()
        secrets = tmp_path / "secrets"
        secrets.mkdir()
        (secrets / "sentinel").write_text(cluster.sentinel_password)
        (secrets / "nodes").write_text(cluster.replication.sentinel_password.get_secret_value())
        missing = f"${{file:{tmp_path / 'not-mounted'}}}"
        block = cluster.redis_block()
        block["sentinel"]["addresses"] = [*block["sentinel"]["addresses"], f"127.0.0.1:{port}"]
        block["sentinel"]["password"] = f"${{file:{secrets / 'sentinel'}}}"
        block["password"] = missing
        customer = testing.merge(
            testing.customer_config(tmp_path, redis_port=port),
            {
                "common-config": {"redis": block, "address-secret": missing},
                "receiver": {"reliable-queue": {"redis": {"username": "receiver", "password": missing}}},
                "redis": {
                    "reliable-queue": {"redis": {"password": missing}},
                    "config-file": str(REDIS_CONF),
                    "replication": {
                        "nodes": cluster.replication.nodes,
                        "replication-password": missing,
                        "sentinel-password": f"${{file:{secrets / 'nodes'}}}",
                    },
                    "sentinel": {
                        "bind": {"inet-interface": "127.0.0.1", "inet-port": port},
                        "announce-hostname": "127.0.0.1",
                        "down-after-milliseconds": 1000,
                        "data-directory": str(tmp_path / "sentinel"),
                    },
                },
            },
        )
        paths = testing.write_configs(tmp_path / "configs", customer)
        config = load_config(*paths, service="redis-sentinel")
        with launched(config, "sentinel") as pod:
            primary = cluster.primary_port()

            def watching() -> bool:
                try:
                    state = _sentinel_master(cluster, port)
                except redis.exceptions.RedisError:
                    return pod.alive() and False
                return int(state["port"]) == primary and int(state["num-other-sentinels"]) == 3

            wait_until(watching, timeout_s=30, what="the new sentinel to watch the primary with its peers")
            # Sentinel rewrites its file (with the passwords) as it learns: private directory and file.
            assert stat.S_IMODE((tmp_path / "sentinel").stat().st_mode) == 0o700
            assert stat.S_IMODE((tmp_path / "sentinel" / "sentinel.conf").stat().st_mode) == 0o600
            # It takes part in the next failover like the others.
            assert primary is not None
            cluster.kill(primary)
            cluster.wait_for_failover(primary)
            wait_until(
                lambda: int(_sentinel_master(cluster, port)["port"]) != primary,
                timeout_s=30,
                what="the new sentinel to follow the failover",
            )


def test_only_the_primarys_exporter_reports_the_queues(tmp_path: Path) -> None:
    # A sum over the Redis pods counts every entry once; after a failover the new primary reports.
    with LocalRedisHA(tmp_path / "ha", replicas=1) as cluster:
        primary = cluster.primary_port()
        assert primary is not None
        replica = next(p for p in cluster.node_ports if p != primary)
        with contextlib.closing(cluster.admin(primary)) as admin:
            admin.xadd("IB-MAIL-QUEUE-P1", {"uuid": "x"})
        wait_until(lambda: cluster.admin(replica).xlen("IB-MAIL-QUEUE-P1") == 1, what="replication")
        values = {}
        for port in (primary, replica):
            registry = CollectorRegistry()
            RedisMetrics(Queues(cluster.admin(port), QueueSettings()), GlobalConfig(), registry)
            values[port] = {s.name: s.value for family in registry.collect() for s in family.samples}
        assert values[primary]["mailer_redis_is_primary"] == 1
        assert values[primary]["default_queue_messages"] == 1
        assert values[replica] == {"mailer_redis_is_primary": 0}
