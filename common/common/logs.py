"""One logging setup for every service (style anchor C5): stderr, one line per event.

``INBOXBOOSTER_LOG_LEVEL`` (the original's variable) sets the level, ``INBOXBOOSTER_LOG_FORMAT=json``
switches to one JSON object per line for the cluster's log stack.  Library modules only call
``logging.getLogger(__name__)``.

Lines about one message carry its identifiers as fields, not only in the text::

    log.info("signed %s", uuid, extra=logs.fields(uuid=uuid, queue=entry.queue, entry_id=entry.id))

In JSON lines they are keys of their own (``uuid``, ``queue``, ``entry_id``, ``recipient``,
``event_id``, ``stream_id``); a recipient address is personal data, so it is logged only as
``recipient_hash`` (the first 16 hex digits of its SHA-256, lower-cased address: the same
address always gives the same hash, so lines about it can still be found).  The text format
shows the message only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import logging.config
import os
import time
from typing import Any, Final

#: ``extra`` keys :class:`JsonFormatter` writes as JSON fields.
FIELDS: Final = ("uuid", "queue", "entry_id", "recipient_hash", "event_id", "stream_id", "peer")


def recipient_hash(address: str) -> str:
    """A stable pseudonym of an e-mail address for logs."""
    return hashlib.sha256(address.strip().lower().encode("utf-8", "surrogateescape")).hexdigest()[:16]


def fields(
    *,
    uuid: str | None = None,
    queue: str | None = None,
    entry_id: str | None = None,
    recipient: str | None = None,
    event_id: str | None = None,
    stream_id: str | None = None,
    peer: str | None = None,
) -> dict[str, str]:
    """``extra`` for a log call about one message (None values left out; the recipient hashed)."""
    out = {
        "uuid": uuid,
        "queue": queue,
        "entry_id": entry_id,
        "recipient_hash": recipient_hash(recipient) if recipient else None,
        "event_id": event_id,
        "stream_id": stream_id,
        "peer": peer,
    }
    return {key: value for key, value in out.items() if value is not None}


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
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                data[name] = value
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
    # Neither format shows where a line was logged or which thread or process logged it, so the
    # records need not collect it: the logging HOWTO's "Optimization" switches.  Finding the
    # caller's frame was a sixth of the cost of a log line (py-spy, HttpReceiver under load).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
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
