"""``mxserver`` section of the customer file (the public MX)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from common.config.base import Bind, Prometheus, ReliableQueueClient, StrictModel


class YahooAbuse(StrictModel):
    """``abuse.yahoo``: the FBL mailbox registered with Yahoo."""

    to: str = Field(..., min_length=3)


class Abuse(StrictModel):
    """Addresses that receive feedback-loop (ARF) reports."""

    yahoo: YahooAbuse | None = None
    addresses: list[str] = Field(
        default_factory=list, description="Other FBL/abuse mailboxes (any provider) this MX accepts."
    )


class MxServerSection(StrictModel):
    """MxServer settings."""

    bind: Bind = Field(..., description="SMTP listener (25 in Kubernetes).")
    eml_directory: Path = Field(Path("tmp"), description="Where unclassified mail is kept.")
    abuse: Abuse = Field(default_factory=Abuse)
    reliable_queue: ReliableQueueClient | None = None
    prometheus: Prometheus = Field(default_factory=Prometheus)
    max_message_size: int = Field(10_485_760, ge=1024, description="SIZE limit in bytes.")
    eml_directory_max_files: int = Field(
        10_000, ge=1, description="Oldest unclassified mails are removed beyond this."
    )
    eml_directory_max_bytes: int = Field(
        1_073_741_824, ge=1024, description="Oldest unclassified mails are removed beyond this total size."
    )
    tls_cert_file: Path | None = Field(None, description="PEM certificate; STARTTLS is offered when set.")
    tls_key_file: Path | None = Field(None, description="PEM key for tls-cert-file.")
    hostname: str | None = Field(None, description="Name in the SMTP banner; default the host name.")
