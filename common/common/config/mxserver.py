"""``mxserver`` section of the customer file (the public MX)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from common.bounces import CLASSIFICATIONS
from common.config.base import Bind, Prometheus, ReliableQueueClient, SmtpLimits, StrictModel

#: Classifications a bounce rule may name (the taxonomy of common.bounces, minus autoreply).
RULE_CLASSIFICATIONS = frozenset(CLASSIFICATIONS) - {"autoreply"}


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


class BounceRule(StrictModel):
    """One bounce rule (``common/bounce-rules.yaml``; the customer's in ``common-config.bounce-rules``).

    A rule whose ``name`` is one of the shipped rules replaces it (``enabled: false`` removes
    it); a new name is tried before every shipped rule.
    """

    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9-]{0,62}$", description="Unique rule name.")
    classification: str | None = Field(
        None, description="Classification of a reason that matches (common.bounces taxonomy); required."
    )
    patterns: list[str] = Field(
        default_factory=list, description="Regular expressions (case-insensitive); any one matching is a hit."
    )
    examples: list[str] = Field(default_factory=list, description="Reasons this rule must classify (tested).")
    unroutable: bool = Field(
        False, description="A failure to find or reach the destination: unroutable when no remote server answered."
    )
    without_code: Literal["hard", "soft", "unroutable"] | None = Field(
        None, description="Type when the report gives no reply code and no status."
    )
    suppress: bool = Field(True, description="false: never suppress the recipient, whatever the classification.")
    yields_to_status: bool = Field(
        False,
        description=(
            "A generic wording: when the enhanced status is about something other than the "
            "address or the mailbox (X.3, X.4, X.6, X.7: e.g. 5.7.1 policy, 5.6.0 content), the status decides."
        ),
    )
    enabled: bool = Field(True, description="false: remove the shipped rule of this name.")

    @field_validator("classification")
    @classmethod
    def _known(cls, value: str | None) -> str | None:
        if value is not None and value not in RULE_CLASSIFICATIONS:
            raise ValueError(f"unknown classification {value!r} (one of {', '.join(sorted(RULE_CLASSIFICATIONS))})")
        return value

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern, re.IGNORECASE)
            except re.error as exc:
                raise ValueError(f"pattern {pattern!r} is not a regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _complete(self) -> BounceRule:
        if not self.enabled:
            return self
        if self.classification is None:
            raise ValueError(f"rule {self.name!r}: classification: required")
        if not self.patterns:
            raise ValueError(f"rule {self.name!r}: patterns: at least one is required")
        if not self.examples:
            raise ValueError(f"rule {self.name!r}: examples: at least one is required")
        compiled = [re.compile(p, re.IGNORECASE) for p in self.patterns]
        for example in self.examples:
            if not any(p.search(example) for p in compiled):
                raise ValueError(f"rule {self.name!r}: example {example!r} is matched by none of its patterns")
        return self


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
    bounce_rules: list[BounceRule] = Field(
        default_factory=list,
        description="Older place of common-config.bounce-rules (read after them, by PostfixLog and MxServer alike).",
    )
    classify_processes: int = Field(
        4,
        ge=1,
        le=64,
        description="Worker processes that parse and classify received mail (off the event loop, at nice +10); "
        "more than the cores on purpose, so that a mail needing much CPU does not make cheap ones wait.",
    )
    classify_timeout_seconds: float = Field(
        10.0, gt=0, description="CPU budget of one mail; a worker over it is replaced and the mail kept unclassified."
    )
    own_hostnames: list[str] = Field(
        default_factory=list,
        description="Host names of our own outbound Postfix (besides postfixlog.string-replacer.main-cf.myhostname): "
        "their reports are already known from the log and produce no event.",
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
