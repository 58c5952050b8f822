"""``transformer`` section of the customer file (headers, return path, DKIM)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

from pydantic import Field, field_validator, model_validator

from common.config.base import Prometheus, ReliableQueueClient, StrictModel

_PLACEHOLDER: Final = re.compile(r"\{\{\s*([A-Za-z-]+)\s*\}\}")
_FIELD_NAME: Final = re.compile(r"^[!-9;-~]+$")

#: Placeholders of ``email-headers.inject`` values (``from-domain`` is the return-path domain,
#: as in the original).
INJECT_PLACEHOLDERS: Final = frozenset(("uuid", "stream-id", "from-domain", "return-path-domain"))
#: Placeholders of ``beacon-url`` (the original's spellings plus ``uuid``).
BEACON_PLACEHOLDERS: Final = frozenset(("stream-id", "streamid", "uuid"))
#: Headers the Transformer writes itself (or that route the message); ``inject`` may not set them.
#: ``List-Unsubscribe`` is accepted (the original's template) and ignored with a warning.
MANAGED_HEADERS: Final = frozenset(
    (
        "from",
        "to",
        "cc",
        "bcc",
        "date",
        "message-id",
        "x-mailer",
        "feedback-id",
        "list-unsubscribe-post",
        "dkim-signature",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "x-uuid",
        "x-stream-id",
        "x-priority",
        "x-returnpathib",
        "x-recipientib",
    )
)


def _unknown_placeholders(template: str, allowed: frozenset[str]) -> list[str]:
    return sorted({m.group(1) for m in _PLACEHOLDER.finditer(template)} - allowed)


def _check_template(template: str, allowed: frozenset[str]) -> None:
    unknown = _unknown_placeholders(template, allowed)
    if unknown:
        raise ValueError(
            f"unknown placeholder {{{{{unknown[0]}}}}}; use " + ", ".join(f"{{{{{name}}}}}" for name in sorted(allowed))
        )
    if "\r" in template or "\n" in template:
        raise ValueError("must be a single line")


def _check_unsubscribe_url(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    lowered = value.lower()
    # Plain http only on loopback: the local stack and tests have no TLS proxy in front.
    loopback = lowered.startswith(("http://127.", "http://localhost:", "http://localhost/", "http://[::1]"))
    if not lowered.startswith("https://") and not loopback:
        raise ValueError("must be an https:// URL (RFC 8058 one-click unsubscribe)")
    _check_template(value, frozenset(("token",)))
    if "{{" not in value:
        raise ValueError("must contain {{token}} (the signed per-message unsubscribe token)")
    bare = _PLACEHOLDER.sub("x", value)
    if len(value) > 800 or any(c in bare for c in ' <>,"') or not bare.isascii():
        raise ValueError("must be a plain ASCII URL without spaces, '<', '>', ',' or quotes")
    return value


class EmailHeaders(StrictModel):
    """Extra headers added to every message; values may use ``{{uuid}}``-style templates."""

    inject: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Header name -> value template ({{uuid}}, {{stream-id}}, {{from-domain}} = return-path "
            "domain, {{return-path-domain}}).  A List-Unsubscribe entry (the original's) is ignored: "
            "the Transformer writes a signed List-Unsubscribe itself."
        ),
    )

    @field_validator("inject")
    @classmethod
    def _valid_headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, template in value.items():
            if not _FIELD_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid header name")
            if name.lower() in MANAGED_HEADERS:
                raise ValueError(f"header {name} is written by the Transformer and cannot be injected")
            try:
                _check_template(template, INJECT_PLACEHOLDERS)
            except ValueError as exc:
                raise ValueError(f"header {name}: {exc}") from None
        return value


class DomainSetting(StrictModel):
    """One sending (From) domain."""

    domain: str = Field(..., min_length=1, description="From-header domain (matched case-insensitively).")
    dkim_private_key_file: Path = Field(..., description="PEM RSA private key (1024-4096 bits).")
    return_path_domain: str = Field(
        ..., min_length=1, description="Envelope sender / Message-ID / unsubscribe domain; MX -> MxServer."
    )
    selector: str = Field("mailer", min_length=1, description="DKIM selector of the RSA key.")
    beacon_url: str | None = Field(
        None, description="Open-tracking pixel URL ({{stream-id}} or {{streamid}}, {{uuid}})."
    )
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

    @field_validator("selector", "ed25519_selector")
    @classmethod
    def _selector(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*", value):
            raise ValueError(f"{value!r} is not a DKIM selector (letters, digits, '-', '_', '.')")
        return value

    @field_validator("beacon_url")
    @classmethod
    def _beacon(cls, value: str | None) -> str | None:
        if value is not None:
            _check_template(value, BEACON_PLACEHOLDERS)
            bare = _PLACEHOLDER.sub("x", value)
            if not bare.isascii() or any(c in bare for c in ' <>"'):
                raise ValueError("must be a plain ASCII URL without spaces, '<', '>' or quotes")
        return value

    @field_validator("unsubscribe_url")
    @classmethod
    def _unsubscribe(cls, value: str | None) -> str | None:
        return _check_unsubscribe_url(value)

    @model_validator(mode="after")
    def _ed25519_pair(self) -> DomainSetting:
        if (self.ed25519_private_key_file is None) != (self.ed25519_selector is None):
            raise ValueError("ed25519-private-key-file and ed25519-selector go together")
        return self


class FeedbackId(StrictModel):
    """Fields of the Feedback-ID header (``campaign:uuid:mail-type:sender-id``)."""

    campaign_id: str | None = Field(None, description="First field when the message has no X-Stream-Id.")
    mail_type: str | None = Field(None, description="Third field (e.g. transactional, newsletter).")
    sender_id: str | None = Field(None, description="Fourth field: your sender id (Gmail Postmaster).")


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

    @field_validator("unsubscribe_url")
    @classmethod
    def _unsubscribe(cls, value: str | None) -> str | None:
        return _check_unsubscribe_url(value)

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
