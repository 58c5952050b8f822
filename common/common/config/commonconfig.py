"""``common-config`` section of the customer file: settings every service may use."""

from __future__ import annotations

from typing import Final, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from common.config.base import GENERATE_HINT, RedisServer, StrictModel, secret_text

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
