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
    """This pod's server, as the admin (the default user).

    ``config.redis_for("redis")`` (the password of ``redis.reliable-queue.redis``, else of
    ``common-config.redis``) on 127.0.0.1:<bind port>, unless ``redis.reliable-queue.redis``
    names another host or port.  Never through the sentinels and without WAIT: the launcher,
    the exporter and the backups talk to *this* data node, whatever its role.
    """
    own = section(config)
    given = own.reliable_queue.redis.model_fields_set if own.reliable_queue is not None else set()
    update: dict[str, object] = {"sentinel": None, "wait_replicas": 0}
    if "hostname" not in given:
        update["hostname"] = "127.0.0.1"
    if "port" not in given:
        update["port"] = own.bind.inet_port
    return config.redis_for("redis").model_copy(update=update)
