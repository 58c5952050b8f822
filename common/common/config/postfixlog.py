"""``postfixlog`` section of the customer file (the Postfix pod)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Final

from pydantic import Field, field_validator

from common.config.base import Prometheus, ReliableQueueClient, StrictModel

#: main.cf parameters PostfixLog manages itself: overriding them would break the loopback-only
#: guarantee, the queue-id mapping or the log follower.
MANAGED_PARAMETERS: Final = frozenset(
    (
        "queue_directory",
        "data_directory",
        "maillog_file",
        "maillog_file_prefixes",
        "inet_interfaces",
        "mynetworks",
        "mynetworks_style",
        "enable_long_queue_ids",
        "smtpd_peername_lookup",
        "smtpd_authorized_xforward_hosts",
    )
)
#: Keys of ``string-replacer.main-cf`` that are not main.cf parameters of the same name.
SPECIAL_KEYS: Final = frozenset(("mailname",))
_PARAMETER_NAME: Final = re.compile(r"^[a-z][a-z0-9_]*$")


def main_cf_problems(main_cf: dict[str, str | int | bool]) -> list[str]:
    """Problems with main.cf overrides, one line each (empty when acceptable)."""
    problems = []
    for key, value in main_cf.items():
        text = ("yes" if value else "no") if isinstance(value, bool) else str(value)
        if key in SPECIAL_KEYS:
            pass
        elif not _PARAMETER_NAME.match(key):
            problems.append(f"{key!r} is not a Postfix parameter name")
        elif key in MANAGED_PARAMETERS:
            problems.append(f"{key!r} is managed by PostfixLog and cannot be overridden")
        if "\n" in text or "\r" in text:
            problems.append(f"{key!r} must be a single line")
    return problems


class PostfixEndpoint(StrictModel):
    """Where PostfixLog injects mail: the private Postfix' loopback smtpd."""

    hostname: str = Field("127.0.0.1", description="Postfix smtpd host (loopback).")
    port: int = Field(10025, ge=1, le=65535, description="Postfix smtpd port.")
    connections: int = Field(8, ge=1, le=64, description="Parallel SMTP sessions PostfixLog keeps open to Postfix.")
    timeout_seconds: float = Field(
        60.0, gt=0, le=600, description="Seconds to wait for one Postfix reply before giving up."
    )


class MasterCf(StrictModel):
    """``string-replacer.master-cf``."""

    smtpd_port: int = Field(10025, ge=1, le=65535, description="Port of Postfix' loopback smtpd.")


class StringReplacer(StrictModel):
    """Postfix configuration overrides (``main-cf.<parameter>: value``)."""

    main_cf: dict[str, str | int | bool] = Field(
        default_factory=dict,
        description=(
            "Any main.cf parameter (e.g. myhostname, maximal_queue_lifetime), plus mailname "
            "(becomes myorigin). YAML booleans become yes/no."
        ),
    )
    master_cf: MasterCf = Field(default_factory=MasterCf)

    @field_validator("main_cf")
    @classmethod
    def _acceptable(cls, value: dict[str, str | int | bool]) -> dict[str, str | int | bool]:
        problems = main_cf_problems(value)
        if problems:
            raise ValueError("; ".join(problems))
        return value


class Sandbox(StrictModel):
    """Route every delivery to one local SMTP sink instead of the internet."""

    enabled: bool = Field(False, description="When true nothing can leave the machine.")
    nexthop: str = Field("[127.0.0.1]:2526", description="Postfix nexthop of the sink.")


class Shaping(StrictModel):
    """Provider-aware traffic shaping (``postfixlog.shaping``; postfixlog.rules).

    The rules (per provider: MX patterns, connections, messages per connection, rate, reply
    patterns; back-off; warm-up) come from the file shipped with PostfixLog, or ``rules-file``;
    ``default``, ``backoff``, ``providers`` and ``warmup`` here override it key by key and are
    validated together with it when PostfixLog starts (and by ``--check-config``).
    """

    enabled: bool = Field(True, description="Route each recipient to its provider's Postfix transport and back off.")
    rules_file: Path | None = Field(None, description="Rules file used instead of the one shipped with PostfixLog.")
    dns_servers: list[str] = Field(
        default_factory=list,
        description="Name servers for MX lookups (default: the system's; none in sandbox mode unless set).",
    )
    dns_timeout_seconds: float = Field(3.0, gt=0, le=30, description="Time limit of one MX lookup.")
    dns_cache_size: int = Field(10000, ge=100, description="Recipient domains whose provider is kept (TTL-bound).")
    default: dict[str, Any] | None = Field(None, description="Overrides of the rule of every provider.")
    backoff: dict[str, Any] | None = Field(None, description="Overrides of the automatic back-off settings.")
    providers: dict[str, dict[str, Any] | None] = Field(
        default_factory=dict, description="Providers added or changed (null removes a shipped provider)."
    )
    warmup: dict[str, Any] = Field(default_factory=dict, description="Daily volume ramps per sending domain.")


class PostfixLogSection(StrictModel):
    """PostfixLog settings."""

    logfile: str | None = Field(None, description="Accepted for compatibility; the log path is derived.")
    reliable_queue: ReliableQueueClient | None = None
    postfix: PostfixEndpoint = Field(default_factory=PostfixEndpoint)
    prometheus: Prometheus = Field(default_factory=Prometheus)
    string_replacer: StringReplacer = Field(default_factory=StringReplacer)
    sandbox: Sandbox = Field(default_factory=Sandbox)
    instance_directory: Path = Field(
        Path("/var/lib/inboxbooster/postfix"),
        description="Private Postfix instance: etc/, queue/, data/, log/ live here.",
    )
    log_rotate_bytes: int = Field(
        64 * 1024 * 1024,
        ge=0,
        description="Rotate Postfix' log (to postfix.log.1) once it is read and this big; 0 = never.",
    )
    instance_state_days: float = Field(
        14.0,
        gt=0,
        le=365,
        description=(
            "An instance's state in Redis (its log position) expires this long after the instance was "
            "last seen; a pod that returns later with its volume would read its log again from the start."
        ),
    )
    shaping: Shaping = Field(default_factory=Shaping)
    stale_consumer_minutes: float = Field(
        60.0,
        gt=0,
        description=(
            "Consumers of the postfixlog group idle this long with no pending entry are deleted "
            "(instances that were scaled away or renamed)."
        ),
    )
