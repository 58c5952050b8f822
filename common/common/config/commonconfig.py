"""``common-config`` section of the customer file: settings every service may use."""

from __future__ import annotations

from typing import Final, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from common.config.base import GENERATE_HINT, RedisServer, StrictModel, secret_text
from common.config.mxserver import BounceRule

#: Shortest configured address secret (bytes): the HMAC key of every return path and unsubscribe tag.
MIN_ADDRESS_SECRET: Final = 32


class ObjectStorage(StrictModel):
    """S3-compatible bucket for Redis backups (uploaded on stop, restored on start; never deleted)."""

    type: Literal["s3"] = Field("s3", description="Only S3 and S3-compatible stores are supported.")
    bucket: str = Field(..., min_length=1, description="Bucket name (it must exist).")
    region: str = Field("us-east-1", description="Bucket region.")
    access_key_id: SecretStr | None = Field(
        None, description="Access key; default the environment's credentials (AWS_*, IRSA, instance role)."
    )
    secret_access_key: SecretStr | None = Field(None, description="Secret key paired with access-key-id.")
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, GCS interoperability, ...); default AWS."
    )
    object_key: str = Field("dump.rdb", min_length=1, description="Object name of the backup.")
    server_side_encryption: Literal["AES256", "aws:kms"] | None = Field(
        None, description="Ask the store to encrypt the backup at rest."
    )
    sse_kms_key_id: str | None = Field(None, description="KMS key for server-side-encryption aws:kms.")

    @model_validator(mode="after")
    def _key_pair(self) -> ObjectStorage:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("access-key-id and secret-access-key go together")
        if self.sse_kms_key_id is not None and self.server_side_encryption != "aws:kms":
            raise ValueError("sse-kms-key-id needs server-side-encryption: aws:kms")
        return self


class ReasonPolicy(StrictModel):
    """How one kind of suppression entry is enforced and how long it is kept."""

    enforce: bool = Field(True, description="Refuse to send to an address with an entry of this reason.")
    enforce_days: float | None = Field(
        None,
        gt=0,
        description="Enforce only while the last such event is younger than this (null: as long as the entry is kept).",
    )
    retention_days: float = Field(
        ..., gt=0, description="The entry expires this long after the last event that fed it (Redis key TTL)."
    )

    @model_validator(mode="after")
    def _enforced_while_kept(self) -> ReasonPolicy:
        if self.enforce_days is not None and self.enforce_days > self.retention_days:
            raise ValueError("enforce-days cannot exceed retention-days (the entry is gone by then)")
        return self


class SuppressionReasons(StrictModel):
    """Policy per reason (``common.suppression`` lists what feeds each one)."""

    bounce: ReasonPolicy = Field(
        default_factory=lambda: ReasonPolicy(enforce_days=30, retention_days=90),
        description="Hard bounces whose address is dead (suppress: true).",
    )
    spam_report: ReasonPolicy = Field(
        default_factory=lambda: ReasonPolicy(retention_days=3650), description="ARF complaints (spam-report events)."
    )
    unsubscribe: ReasonPolicy = Field(
        default_factory=lambda: ReasonPolicy(retention_days=3650),
        description="One-click and mailto unsubscribes (unsubscribe events).",
    )
    manual: ReasonPolicy = Field(
        default_factory=lambda: ReasonPolicy(retention_days=3650),
        description="Entries added over the API or with mailer-suppressions.",
    )


class Suppression(StrictModel):
    """``common-config.suppression``: the list checked before signing (``common.suppression``)."""

    enabled: bool = Field(True, description="Feed the list from events and enforce it in the Transformer.")
    scope: Literal["domain", "stream"] = Field(
        "domain",
        description=(
            "domain: one list per From domain; stream: one list per X-Stream-Id (a message without one uses "
            "its From domain's list)."
        ),
    )
    reasons: SuppressionReasons = Field(default_factory=SuppressionReasons)


class Trace(StrictModel):
    """``common-config.trace``: the per-message timeline (``common.trace``)."""

    enabled: bool = Field(True, description="Record every stage of every message (GET /v1/messages/<uuid>).")
    retention_days: float = Field(7.0, gt=0, description="A message's timeline expires this long after its last entry.")
    max_entries: int = Field(200, ge=10, le=10_000, description="Newest entries kept per uuid (older are trimmed).")


class DnsCheck(StrictModel):
    """``common-config.dns-check``: what ``transformer-dkim check`` compares the DNS with."""

    sending_ips: list[str] = Field(
        default_factory=list, description="Public addresses Postfix sends from (SPF, HELO A/PTR)."
    )
    mx_host: str | None = Field(
        None, description="Host name the return-path domains' MX must point at (default mxserver.hostname)."
    )
    helo_name: str | None = Field(
        None, description="Postfix' HELO name (default postfixlog.string-replacer.main-cf.myhostname)."
    )


class CommonConfig(StrictModel):
    """``common-config``."""

    object_storage: ObjectStorage | None = None
    redis: RedisServer | None = Field(
        None, description="Default Redis for every service without its own reliable-queue.redis."
    )
    address_secret: SecretStr | None = Field(
        None,
        description=(
            f"HMAC secret of return-path/unsubscribe tags (at least {MIN_ADDRESS_SECRET} bytes); "
            "generated and kept in Redis if unset."
        ),
    )
    suppression: Suppression = Field(default_factory=Suppression)
    bounce_rules: list[BounceRule] = Field(
        default_factory=list,
        description="Bounce rules added to (new names, tried first) or replacing (same name) the shipped ones, "
        "for every reader of failures: PostfixLog (Postfix' own) and MxServer (bounce mail).",
    )
    trace: Trace = Field(default_factory=Trace)
    dns_check: DnsCheck = Field(default_factory=DnsCheck)
    binding_retention_days: float = Field(
        30.0,
        gt=0,
        description=(
            "How long the record of who a message went to is kept (IB:sent:<uuid>), so that bounces, "
            "spam reports and unsubscribes -- also redacted ones -- resolve to the right recipient."
        ),
    )

    @field_validator("address_secret")
    @classmethod
    def _strong_address_secret(cls, value: SecretStr | None) -> SecretStr | None:
        text = secret_text(value)
        if text is not None and len(text.encode()) < MIN_ADDRESS_SECRET:
            raise ValueError(f"{len(text.encode())} bytes; at least {MIN_ADDRESS_SECRET} are required; {GENERATE_HINT}")
        return value
