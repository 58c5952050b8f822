"""``postfixlog`` section of the customer file (the Postfix pod)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from common.config.base import Prometheus, ReliableQueueClient, StrictModel


class PostfixEndpoint(StrictModel):
    """Where PostfixLog injects mail: the private Postfix' loopback smtpd."""

    hostname: str = Field("127.0.0.1", description="Postfix smtpd host (loopback).")
    port: int = Field(10025, ge=1, le=65535, description="Postfix smtpd port.")


class MasterCf(StrictModel):
    """``string-replacer.master-cf``."""

    smtpd_port: int = Field(10025, ge=1, le=65535, description="Port of Postfix' loopback smtpd.")


class StringReplacer(StrictModel):
    """Postfix configuration overrides (``main-cf.<parameter>: value``)."""

    main_cf: dict[str, str | int | bool] = Field(default_factory=dict)
    master_cf: MasterCf = Field(default_factory=MasterCf)


class Sandbox(StrictModel):
    """Route every delivery to one local SMTP sink instead of the internet."""

    enabled: bool = Field(False, description="When true nothing can leave the machine.")
    nexthop: str = Field("[127.0.0.1]:2526", description="Postfix nexthop of the sink.")


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
