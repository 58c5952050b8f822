"""``redis`` section of the customer file (the Redis pod's sidecar)."""

from __future__ import annotations

from pydantic import Field

from common.config.base import Prometheus, ReliableQueueClient, StrictModel


class RedisSection(StrictModel):
    """Queue-depth exporter and backup settings."""

    reliable_queue: ReliableQueueClient | None = None
    prometheus: Prometheus = Field(default_factory=Prometheus)
