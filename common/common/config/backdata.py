"""``backdata`` section of the customer file (webhook delivery)."""

from __future__ import annotations

from pydantic import Field, SecretStr

from common.config.base import Prometheus, ReliableQueueClient, StrictModel


class BounceManager(StrictModel):
    """Optional Inboxbooster bounce-manager statistics endpoint (original §3.4)."""

    secret: SecretStr
    cid: int | str
    url: str = Field(..., min_length=1)


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
    batch_max_wait_ms: int = Field(200, ge=0, description="Longest wait to fill a batch.")
    max_age_seconds: int = Field(
        259_200, ge=1, description="Events older than this are dead-lettered (3 days)."
    )
    timeout_seconds: float = Field(10.0, gt=0, description="HTTP timeout of one POST.")
    max_backoff_seconds: float = Field(300.0, gt=0, description="Longest wait between retries.")
