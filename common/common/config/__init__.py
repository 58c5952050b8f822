"""Typed, strict configuration for both files (style anchor C4).

``load_config`` validates ``inboxbooster-mailer-global.yaml`` and
``inboxbooster-mailer-customer.yaml`` and raises :class:`~common.errors.ConfigError` listing
every problem as ``<file>: <key.path>: <what is wrong>``.
"""

from common.config.base import AuthLogin, Bind, Prometheus, RedisServer, ReliableQueueClient
from common.config.customer import CustomerConfig
from common.config.globalfile import GlobalConfig
from common.config.loader import (
    DEFAULT_CUSTOMER_FILE,
    DEFAULT_GLOBAL_FILE,
    REQUIRED_SECTIONS,
    Config,
    load_config,
)

__all__ = [
    "DEFAULT_CUSTOMER_FILE",
    "DEFAULT_GLOBAL_FILE",
    "REQUIRED_SECTIONS",
    "AuthLogin",
    "Bind",
    "Config",
    "CustomerConfig",
    "GlobalConfig",
    "Prometheus",
    "RedisServer",
    "ReliableQueueClient",
    "load_config",
]
