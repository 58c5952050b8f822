"""Which Redis the sidecar talks to: the one running in its own pod.

The exporter and the backup must reach *this pod's* server directly (127.0.0.1), never through
the ``redis`` Service: a Service only routes to ready pods, and the pod's readiness depends on
the exporter reaching Redis.
"""

from __future__ import annotations

from common.config import Config, RedisServer
from common.config.redismodule import RedisSection
from common.errors import ConfigError


def section(config: Config) -> RedisSection:
    """The customer file's ``redis`` section (present once ``cli.load`` accepted the files)."""
    found = config.customer.redis
    if found is None:
        raise ConfigError([f"{config.customer_path}: redis: section is missing"])
    return found


def local_server(config: Config) -> RedisServer:
    """``redis.reliable-queue.redis`` when set, else 127.0.0.1:<bind port> with the shared password."""
    own = section(config)
    if own.reliable_queue is not None:
        return own.reliable_queue.redis
    shared = config.customer.common_config.redis or RedisServer()
    return shared.model_copy(update={"hostname": "127.0.0.1", "port": own.bind.inet_port})
