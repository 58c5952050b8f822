"""``receiver`` section of the customer file (SMTP submission, port 587)."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

from pydantic import Field, field_validator

from common.config.base import AuthLogin, Bind, Prometheus, ReliableQueueClient, SmtpAuthLockout, SmtpLimits


class ReceiverSection(SmtpLimits):
    """SMTP submission: STARTTLS + AUTH, validates and enqueues to the P0/P1 streams (limits: SmtpLimits)."""

    bind: Bind = Field(..., description="SMTP listener (587 in Kubernetes).")
    auth_logins: list[AuthLogin] = Field(default_factory=list, description="SMTP AUTH accounts.")
    ignore_smtp_mail_from_rcpt_to: bool = Field(
        True, description="Recipients come from To/Cc headers; only true is supported (as the original)."
    )
    reliable_queue: ReliableQueueClient | None = None
    prometheus: Prometheus = Field(default_factory=Prometheus)
    implicit_tls_port: int | None = Field(
        None, ge=0, le=65535, description="Optional implicit-TLS submission port (465, RFC 8314)."
    )
    trusted_networks: list[IPv4Network | IPv6Network] = Field(
        default_factory=list, description="CIDRs whose clients may submit without AUTH."
    )
    max_message_size: int = Field(26_214_400, ge=1024, description="SIZE limit in bytes.")
    tls_cert_file: Path | None = Field(
        None, description="PEM certificate; default receiver_cert.pem next to the customer file."
    )
    tls_key_file: Path | None = Field(None, description="PEM key; default receiver_key.pem next to the customer file.")
    hostname: str | None = Field(None, description="Name in the SMTP banner; default the host name.")
    processes: int = Field(0, ge=0, description="Worker processes sharing the port (0 = one per core).")
    auth_lockout: SmtpAuthLockout = Field(default_factory=SmtpAuthLockout)
    shutdown_grace_seconds: float = Field(
        25.0,
        gt=0,
        description="On SIGTERM, how long open transactions may take to finish (keep below the pod's grace period).",
    )

    @field_validator("ignore_smtp_mail_from_rcpt_to")
    @classmethod
    def _only_true(cls, value: bool) -> bool:
        if not value:
            raise ValueError("only true is supported: recipients are taken from the To and Cc headers")
        return value
