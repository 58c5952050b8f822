"""One logging setup for every service (style anchor C5): stderr, one line per event.

``INBOXBOOSTER_LOG_LEVEL`` (the original's variable) sets the level, ``INBOXBOOSTER_LOG_FORMAT=json``
switches to one JSON object per line for the cluster's log stack.  Library modules only call
``logging.getLogger(__name__)``.
"""

from __future__ import annotations

import json
import logging
import logging.config
import os
import time
from typing import Any

_TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(service)s %(name)s: %(message)s"


class _ServiceFilter(logging.Filter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as JSON."""
        data: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": getattr(record, "service", ""),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


def setup(service: str, level: str | None = None, *, json_format: bool | None = None) -> None:
    """Install the stderr handler for ``service``; call once, from ``main``."""
    level = (level or os.environ.get("INBOXBOOSTER_LOG_LEVEL") or "INFO").upper()
    if json_format is None:
        json_format = os.environ.get("INBOXBOOSTER_LOG_FORMAT", "").lower() == "json"
    formatter: dict[str, Any] = (
        {"()": JsonFormatter} if json_format else {"format": _TEXT_FORMAT, "datefmt": "%Y-%m-%dT%H:%M:%S"}
    )
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "filters": {"service": {"()": _ServiceFilter, "service": service}},
            "formatters": {"main": formatter},
            "handlers": {
                "stderr": {
                    "class": "logging.StreamHandler",
                    "stream": "ext://sys.stderr",
                    "formatter": "main",
                    "filters": ["service"],
                }
            },
            "root": {"level": level, "handlers": ["stderr"]},
            "loggers": {
                # Per-command chatter of libraries stays out of INFO logs.
                "mail.log": {"level": "WARNING"},
                "urllib3": {"level": "WARNING"},
            },
        }
    )
