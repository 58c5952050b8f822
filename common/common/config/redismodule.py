"""``redis`` section of the customer file: the Redis pod (server launcher, exporter, backups).

``redis-sidecar server`` starts ``redis-server`` with ``config-file`` plus the runtime settings
below; ``redis-sidecar exporter`` reads queue depths.  Both reach the Redis of this pod: the
section's ``reliable-queue.redis`` when set, else ``127.0.0.1:<bind.inet-port>`` with the
password of ``common-config.redis`` (the one every other service uses).

With ``replication`` (the ``deploy/ha`` layout) the pod is one of several data nodes: the
launcher asks the sentinels (``common-config.redis.sentinel``) which node is the primary and
starts as its replica, or as the primary when it is the one (:mod:`redis_sidecar.topology`).
``redis-sidecar sentinel`` runs one Sentinel with the settings of ``sentinel``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator

from common.config.base import Prometheus, ReliableQueueClient, StrictModel, split_address

#: Port of the data nodes unless ``replication.nodes`` says otherwise.
REDIS_PORT = 6379


class RedisBind(StrictModel):
    """Where redis-server listens."""

    inet_interface: str = Field(
        "0.0.0.0",
        description="Listen address; anything but loopback requires a password (common-config.redis.password).",
    )
    inet_port: int = Field(6379, ge=1, le=65535, description="Redis TCP port.")


class Replication(StrictModel):
    """Several data nodes, one primary at a time, chosen by Sentinel (``deploy/ha``)."""

    nodes: list[str] = Field(
        ...,
        min_length=2,
        description=(
            "Every data node, host:port (the StatefulSet's pod names); the first is the primary of a "
            "brand-new installation (before any sentinel knows one)."
        ),
    )
    announce_hostname: str | None = Field(
        None,
        description=(
            "Name this node is known by (default: the entry of nodes that starts with this host's name, "
            "else its fully qualified name)."
        ),
    )
    min_replicas_to_write: int = Field(
        1,
        ge=0,
        description=(
            "The primary refuses writes (receivers answer 451/503) while fewer replicas are connected "
            "and current (redis min-replicas-to-write)."
        ),
    )
    min_replicas_max_lag: int = Field(
        10, ge=1, description="Seconds since a replica's last acknowledgement for it to count (min-replicas-max-lag)."
    )
    replication_password: SecretStr = Field(
        ..., description="Password of the ACL user 'replication' replicas log in to the primary with."
    )
    sentinel_password: SecretStr = Field(
        ..., description="Password of the ACL user 'sentinel' the sentinels log in to the data nodes with."
    )

    @field_validator("nodes")
    @classmethod
    def _nodes(cls, value: list[str]) -> list[str]:
        for node in value:
            split_address(node, REDIS_PORT)
        return value

    def hosts(self) -> list[tuple[str, int]]:
        """The data nodes as (host, port) pairs."""
        return [split_address(n, REDIS_PORT) for n in self.nodes]


class SentinelProcess(StrictModel):
    """One Redis Sentinel (``redis-sidecar sentinel``); its peers are ``common-config.redis.sentinel``."""

    bind: RedisBind = Field(
        default_factory=lambda: RedisBind(inet_port=26379), description="Where the sentinel listens."
    )
    announce_hostname: str | None = Field(
        None,
        description=(
            "Name the other sentinels and the clients reach this one by (default: the entry of "
            "common-config.redis.sentinel.addresses that starts with this host's name, else its FQDN)."
        ),
    )
    quorum: int = Field(2, ge=1, description="Sentinels that must agree the primary is down before a failover.")
    down_after_milliseconds: int = Field(
        5000, ge=100, description="A primary silent this long is considered down (by this sentinel)."
    )
    failover_timeout_milliseconds: int = Field(60000, ge=1000, description="Sentinel failover-timeout.")
    data_directory: Path = Field(
        Path("/sentinel"),
        description="Where the sentinel keeps its rewritten configuration (a memory-backed volume).",
    )


class AutoscalerUser(StrictModel):
    """The Redis user KEDA reads the queues' lag with (``deploy/autoscaled``): stream statistics only."""

    username: str = Field("keda", min_length=1, description="ACL user name (in KEDA's TriggerAuthentication too).")
    password: SecretStr = Field(..., description="Its password (the TriggerAuthentication's Secret holds it too).")


class RedisSection(StrictModel):
    """The Redis pod: redis-server settings, queue-depth exporter, backup schedule."""

    reliable_queue: ReliableQueueClient | None = Field(
        None, description="Where the sidecar reaches Redis; default this pod's server on 127.0.0.1."
    )
    prometheus: Prometheus = Field(default_factory=Prometheus)
    bind: RedisBind = Field(default_factory=RedisBind)
    config_file: Path = Field(
        Path("/etc/redis/redis.conf"), description="Static redis.conf (Redis/redis.conf in the image)."
    )
    data_directory: Path = Field(Path("/data"), description="Redis' data directory (AOF directory, RDB snapshots).")
    appendfsync: Literal["always", "everysec", "no"] = Field(
        "always",
        description="AOF fsync policy: always = a write is on disk before Redis answers (receivers' 250).",
    )
    maxmemory: str | None = Field(
        None,
        description=(
            "Memory limit in Redis syntax (e.g. 2gb); writes fail (no eviction) beyond it. "
            "Default: 75% of the container's memory limit, none without a limit."
        ),
    )
    backup_interval_seconds: int = Field(
        0,
        ge=0,
        description="With object storage: also back up every N seconds while running (0 = only on stop).",
    )
    redis_server: str = Field("redis-server", min_length=1, description="redis-server executable.")
    replication: Replication | None = Field(
        None, description="This pod is one of several data nodes with Sentinel (deploy/ha); absent: one server."
    )
    sentinel: SentinelProcess | None = Field(
        None, description="Settings of the Sentinel pods (redis-sidecar sentinel)."
    )
    autoscaler: AutoscalerUser | None = Field(
        None, description="A read-only Redis user for KEDA's queue-lag triggers (deploy/autoscaled)."
    )

    @field_validator("maxmemory")
    @classmethod
    def _memory_size(cls, value: str | None) -> str | None:
        if value is None:
            return None
        text = value.strip().lower()
        digits = text.rstrip("kmgb")
        if not digits.isdigit() or text[len(digits) :] not in ("", "b", "k", "kb", "m", "mb", "g", "gb"):
            raise ValueError(f"{value!r} is not a Redis memory size (e.g. 1536mb, 2gb)")
        return text
