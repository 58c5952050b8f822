"""``transformer`` section of the customer file (headers, return path, DKIM)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from common.config.base import Prometheus, ReliableQueueClient, StrictModel


class EmailHeaders(StrictModel):
    """Extra headers added to every message; values may use ``{{uuid}}``-style templates."""

    inject: dict[str, str] = Field(default_factory=dict)


class DomainSetting(StrictModel):
    """One sending (From) domain."""

    domain: str = Field(..., min_length=1, description="From-header domain (matched case-insensitively).")
    dkim_private_key_file: Path = Field(..., description="PEM RSA private key (1024-4096 bits).")
    return_path_domain: str = Field(
        ..., min_length=1, description="Envelope sender / Message-ID / unsubscribe domain; MX -> MxServer."
    )
    selector: str = Field("mailer", min_length=1, description="DKIM selector of the RSA key.")
    beacon_url: str | None = Field(None, description="Open-tracking pixel URL ({{stream-id}}, {{uuid}}).")
    ed25519_private_key_file: Path | None = Field(
        None, description="Optional ed25519 key for a second signature (RFC 8463)."
    )
    ed25519_selector: str | None = Field(None, description="Selector of the ed25519 key.")
    unsubscribe_url: str | None = Field(
        None, description="One-click unsubscribe URL template for this domain; overrides the section's."
    )

    @field_validator("domain", "return_path_domain")
    @classmethod
    def _lower(cls, value: str) -> str:
        value = value.strip().lower().rstrip(".")
        if "@" in value or " " in value or "." not in value:
            raise ValueError(f"{value!r} is not a domain name")
        return value

    @model_validator(mode="after")
    def _ed25519_pair(self) -> DomainSetting:
        if (self.ed25519_private_key_file is None) != (self.ed25519_selector is None):
            raise ValueError("ed25519-private-key-file and ed25519-selector go together")
        return self


class FeedbackId(StrictModel):
    """Fields of the Feedback-ID header (``campaign:uuid:mail-type:sender-id``)."""

    campaign_id: str | None = None
    mail_type: str | None = None
    sender_id: str | None = None


class TransformerSection(StrictModel):
    """Transformer settings."""

    email_headers: EmailHeaders = Field(default_factory=EmailHeaders)
    reliable_queue: ReliableQueueClient | None = None
    domain_settings: list[DomainSetting] = Field(..., min_length=1)
    feedback_id: FeedbackId = Field(default_factory=FeedbackId)
    prometheus: Prometheus = Field(default_factory=Prometheus)
    unsubscribe_url: str | None = Field(
        None,
        description="https one-click unsubscribe URL template, e.g. https://mail.example.com/unsubscribe/{{token}}.",
    )

    @field_validator("domain_settings")
    @classmethod
    def _unique_domains(cls, value: list[DomainSetting]) -> list[DomainSetting]:
        seen: set[str] = set()
        for setting in value:
            if setting.domain in seen:
                raise ValueError(f"domain {setting.domain!r} is listed twice")
            seen.add(setting.domain)
        return value

    def domain(self, name: str) -> DomainSetting | None:
        """Settings of a From domain (case-insensitive), or None when it is not configured."""
        wanted = name.strip().lower().rstrip(".")
        for setting in self.domain_settings:
            if setting.domain == wanted:
                return setting
        return None

    @property
    def return_path_domains(self) -> frozenset[str]:
        """Every configured return-path domain (the domains MxServer accepts mail for)."""
        return frozenset(s.return_path_domain for s in self.domain_settings)
