"""``redis`` section of the customer file: the Redis pod (server launcher, exporter, backups).

``redis-sidecar server`` starts ``redis-server`` with ``config-file`` plus the runtime settings
below; ``redis-sidecar exporter`` reads queue depths.  Both reach the Redis of this pod: the
section's ``reliable-queue.redis`` when set, else ``127.0.0.1:<bind.inet-port>`` with the
password of ``common-config.redis`` (the one every other service uses).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from common.config.base import Prometheus, ReliableQueueClient, StrictModel


class RedisBind(StrictModel):
    """Where redis-server listens."""

    inet_interface: str = Field(
        "0.0.0.0",
        description="Listen address; anything but loopback requires a password (common-config.redis.password).",
    )
    inet_port: int = Field(6379, ge=1, le=65535, description="Redis TCP port.")


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
