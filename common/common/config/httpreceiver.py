"""``httpreceiver`` section of the customer file (HTTP submission API)."""

from __future__ import annotations

from pydantic import Field, SecretStr, model_validator

from common.config.base import AuthLockout, AuthLogin, Prometheus, ReliableQueueClient, StrictModel


class HttpBind(StrictModel):
    """API and metrics listeners."""

    inet_interface: str = Field("0.0.0.0", description="Listen address of both ports.")
    inet_port: int = Field(8080, ge=0, le=65535, description="API port.")
    inet_port_metrics: int = Field(9090, ge=0, le=65535, description="Metrics/health port.")

    @model_validator(mode="after")
    def _distinct_ports(self) -> HttpBind:
        if self.inet_port == self.inet_port_metrics and self.inet_port != 0:
            raise ValueError("inet-port and inet-port-metrics must differ (metrics never share the API port)")
        return self


class HttpReceiverSection(StrictModel):
    """``POST /v1/mail/send`` and the RFC 8058 one-click unsubscribe endpoint."""

    bind: HttpBind = Field(default_factory=HttpBind)
    auth_logins: list[AuthLogin] = Field(default_factory=list, description="HTTP Basic accounts.")
    api_keys: list[SecretStr] = Field(default_factory=list, description="Bearer API keys.")
    reliable_queue: ReliableQueueClient | None = None
    prometheus: Prometheus | None = Field(
        None, description="Accepted for compatibility; metrics are served on bind.inet-port-metrics."
    )
    max_message_size: int = Field(26_214_400, ge=1024, description="Largest accepted body in bytes.")
    idempotency_window_seconds: int = Field(
        86_400, ge=0, description="How long an Idempotency-Key is remembered (0 disables the feature)."
    )
    auth_lockout: AuthLockout = Field(
        default_factory=AuthLockout, description="Brute-force protection of HTTP Basic and bearer keys."
    )
    trusted_proxy_hops: int = Field(
        0,
        ge=0,
        le=5,
        description="Reverse proxies in front that append X-Forwarded-For (the client address used by auth-lockout).",
    )
    workers: int = Field(
        0,
        ge=0,
        le=256,
        description="gunicorn worker processes, each an asyncio loop plus `threads` (0 = one per core).",
    )
    threads: int = Field(
        4,
        ge=1,
        le=256,
        description=(
            "Threads per worker that run the Flask endpoints (unsubscribe, control API) and password hashes, "
            "on complete requests; the send endpoint runs in the event loop."
        ),
    )
    request_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="A request body must arrive within this time after its headers, else 408 (slow clients).",
    )
    unsubscribe_rate_limit: int = Field(
        30,
        ge=1,
        description=(
            "One-click unsubscribe requests per client address and minute that do nothing (forged tokens, "
            "repeats, malformed forms) before the address gets 429; a genuine first click never counts."
        ),
    )
