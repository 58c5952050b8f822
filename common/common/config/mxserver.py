"""``mxserver`` section of the customer file (the public MX)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from common.config.base import Bind, Prometheus, ReliableQueueClient, SmtpLimits, StrictModel


class YahooAbuse(StrictModel):
    """``abuse.yahoo``: the FBL mailbox registered with Yahoo."""

    to: str = Field(..., min_length=3)


class Abuse(StrictModel):
    """Addresses that receive feedback-loop (ARF) reports."""

    yahoo: YahooAbuse | None = None
    addresses: list[str] = Field(
        default_factory=list, description="Other FBL/abuse mailboxes (any provider) this MX accepts."
    )

    def all(self) -> frozenset[str]:
        """Every configured abuse/FBL mailbox, lower-cased."""
        found = {a.strip().strip("<>").lower() for a in self.addresses}
        if self.yahoo is not None:
            found.add(self.yahoo.to.strip().strip("<>").lower())
        return frozenset(a for a in found if "@" in a)


class MxServerSection(SmtpLimits):
    """MxServer settings (connection and session limits: SmtpLimits)."""

    bind: Bind = Field(..., description="SMTP listener (25 in Kubernetes).")
    eml_directory: Path = Field(
        Path("tmp"), description="Where unclassified mail is kept (relative to the working directory)."
    )
    abuse: Abuse = Field(default_factory=Abuse)
    reliable_queue: ReliableQueueClient | None = None
    prometheus: Prometheus = Field(default_factory=Prometheus)
    max_message_size: int = Field(10_485_760, ge=1024, description="SIZE limit in bytes.")
    eml_directory_max_files: int = Field(10_000, ge=1, description="Oldest unclassified mails are removed beyond this.")
    eml_directory_max_bytes: int = Field(
        1_073_741_824, ge=1024, description="Oldest unclassified mails are removed beyond this total size."
    )
    tls_cert_file: Path | None = Field(None, description="PEM certificate; STARTTLS is offered when set.")
    tls_key_file: Path | None = Field(None, description="PEM key for tls-cert-file.")
    hostname: str | None = Field(None, description="Name in the SMTP banner; default the host name.")
    max_connections: int = Field(
        200,
        ge=1,
        description="Concurrent SMTP sessions; further clients get 421 and retry later. "
        "Worst-case memory is about 2 x max-connections x max-message-size.",
    )
    max_connections_per_ip: int = Field(
        10, ge=1, description="Concurrent SMTP sessions from one client address; a sending MTA needs few."
    )
    max_session_seconds: float = Field(
        900.0, gt=0, description="Longest session; a transaction in progress is finished first."
    )

    @model_validator(mode="after")
    def _consistent(self) -> MxServerSection:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls-cert-file and tls-key-file go together")
        if self.eml_directory_max_bytes < self.max_message_size:
            raise ValueError(
                "eml-directory-max-bytes must be at least max-message-size "
                f"({self.eml_directory_max_bytes} < {self.max_message_size})"
            )
        return self
