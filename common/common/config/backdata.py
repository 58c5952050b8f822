"""``backdata`` section of the customer file (webhook delivery)."""

from __future__ import annotations

import base64
import binascii
from typing import Final
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator

from common.config.base import Prometheus, ReliableQueueClient, StrictModel, secret_text

#: Prefix of Standard Webhooks secrets (the rest is the base64 key).
WHSEC_PREFIX: Final = "whsec_"
#: Shortest accepted webhook key in bytes (Standard Webhooks generates 24 to 64).
MIN_WEBHOOK_KEY: Final = 24


def webhook_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret: ``whsec_`` + base64 (the prefix is optional).

    Decoded as the ``standardwebhooks`` reference library does (missing padding tolerated).

    Raises:
        ValueError: the secret is not base64 or decodes to nothing.
    """
    text = secret.strip().removeprefix(WHSEC_PREFIX)
    try:
        key = base64.b64decode(text + "==", validate=False)
    except (binascii.Error, ValueError):
        raise ValueError("not a Standard Webhooks secret: expected whsec_ followed by base64") from None
    if not key:
        raise ValueError("not a Standard Webhooks secret: the base64 key after whsec_ is empty")
    return key


def _check_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an absolute http:// or https:// URL")
    return value


class BounceManager(StrictModel):
    """Optional Inboxbooster bounce-manager statistics endpoint (original §3.4)."""

    secret: SecretStr = Field(..., description="HMAC key of the hash query parameter.")
    cid: int | str = Field(..., description="Customer id sent as the cid query parameter.")
    url: str = Field(..., min_length=1, description="Endpoint receiving anonymised delivery/bounce records.")

    _url = field_validator("url")(_check_url)


class BackDataSection(StrictModel):
    """BackData settings."""

    reliable_queue: ReliableQueueClient | None = None
    post_url: str = Field(..., min_length=1, description="The customer's webhook URL.")
    bounce_manager: BounceManager | None = None
    prometheus: Prometheus = Field(default_factory=Prometheus)
    webhook_secret: SecretStr | None = Field(
        None, description="Standard Webhooks secret (whsec_…); enables webhook-signature headers."
    )
    webhook_secret_previous: SecretStr | None = Field(
        None, description="Second secret, also used to sign during a rotation."
    )
    batch_size: int = Field(50, ge=1, le=10_000, description="Events per POST.")
    batch_max_wait_ms: int = Field(50, ge=0, description="Longest wait to fill a batch.")
    max_age_seconds: int = Field(259_200, ge=1, description="Events older than this are dead-lettered (3 days).")
    timeout_seconds: float = Field(10.0, gt=0, description="HTTP timeout of one POST.")
    max_backoff_seconds: float = Field(300.0, gt=0, description="Longest wait between retries.")

    _url = field_validator("post_url")(_check_url)

    @field_validator("webhook_secret", "webhook_secret_previous")
    @classmethod
    def _secret(cls, value: SecretStr | None) -> SecretStr | None:
        text = secret_text(value)
        if text is not None:
            key = webhook_key(text)
            if len(key) < MIN_WEBHOOK_KEY:
                raise ValueError(
                    f"the key after whsec_ decodes to {len(key)} bytes; at least {MIN_WEBHOOK_KEY} are required; "
                    'generate one with `echo "whsec_$(openssl rand -base64 32)"`'
                )
        return value
