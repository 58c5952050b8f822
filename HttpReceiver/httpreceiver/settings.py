"""Names and settings lookups shared by the app (workers) and the server (gunicorn master)."""

from __future__ import annotations

from typing import Final

from common.config import Config
from common.config.httpreceiver import HttpReceiverSection
from common.errors import ConfigError

SERVICE: Final = "httpreceiver"


def section_of(config: Config) -> HttpReceiverSection:
    """The ``httpreceiver`` section of the customer file.

    Raises:
        ConfigError: it is missing.
    """
    section = config.customer.httpreceiver
    if section is None:
        raise ConfigError([f"{config.customer_path}: httpreceiver: section is missing"])
    return section
