"""``common-config`` section of the customer file: settings every service may use."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr

from common.config.base import RedisServer, StrictModel


class ObjectStorage(StrictModel):
    """S3-compatible bucket for Redis backups."""

    type: Literal["s3"] = "s3"
    bucket: str = Field(..., min_length=1)
    region: str = "us-east-1"
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    endpoint_url: str | None = None
    object_key: str = Field("dump.rdb", min_length=1, description="Object name of the backup.")


class CommonConfig(StrictModel):
    """``common-config``."""

    object_storage: ObjectStorage | None = None
    redis: RedisServer | None = Field(
        None, description="Default Redis for every service without its own reliable-queue.redis."
    )
    address_secret: SecretStr | None = Field(
        None,
        description="HMAC secret of return-path/unsubscribe tags; generated and kept in Redis if unset.",
    )
