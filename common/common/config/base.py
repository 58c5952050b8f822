"""Building blocks shared by every configuration section.

All models are strict (unknown keys are errors), frozen (config is read once in ``main`` and
passed down) and use the original kebab-case key names (``inet-port``), mapped to snake_case
attributes.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from common.errors import ConfigError

#: ``${env:NAME}`` / ``${file:/path}``: a value the loader reads from the environment or a file.
REFERENCE: Final = re.compile(r"^\$\{(env|file):([^}]+)\}$")
#: How to make a good secret (named in every weak-secret error).
GENERATE_HINT: Final = "generate one with `openssl rand -base64 32`"
#: Shortest Redis password accepted when Redis is not on loopback.
MIN_REDIS_PASSWORD: Final = 16


def kebab(name: str) -> str:
    """Map an attribute name to the YAML key used by the original configuration files."""
    return name.replace("_", "-")


class StrictModel(BaseModel):
    """Base of every config model: unknown keys and wrong types are refused."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        alias_generator=kebab,
        populate_by_name=True,
        strict=False,
        hide_input_in_errors=True,
    )


Port = int


class UnresolvedSecret(SecretStr):
    """A ``${file:…}``/``${env:…}`` reference this service does not read and could not resolve.

    Each pod mounts only the secrets its service uses (DESIGN §8), but every pod reads the one
    customer file; references in sections a service never reads stay unresolved.  Reading one
    is a bug (the service uses a secret it was not given) and raises :class:`ConfigError`.
    """

    def get_secret_value(self) -> str:
        """Never a value.

        Raises:
            ConfigError: always, naming the reference.
        """
        raise ConfigError([f"{super().get_secret_value()} is not available to this service (not mounted)"])


def secret_text(value: SecretStr | None) -> str | None:
    """The secret's text, or None: absent, unresolved, or a reference not expanded yet.

    (A model validated without :func:`common.config.load_config` still holds ``${…}`` text.)
    Validators skip None.
    """
    if value is None or isinstance(value, UnresolvedSecret):
        return None
    text = value.get_secret_value()
    return None if REFERENCE.match(text.strip()) else text


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class RedisServer(StrictModel):
    """Where a service finds Redis (``<service>.reliable-queue.redis``)."""

    hostname: str = Field("redis", description="Redis host name or IP address.")
    port: int = Field(6379, ge=1, le=65535, description="Redis TCP port.")
    password: SecretStr | None = Field(
        None, description="Redis password (use ${env:VAR} or ${file:/path} to keep it out of YAML)."
    )
    username: str | None = Field(
        None, description="Redis ACL user name; each service has its own (common.redisacl), default: the default user."
    )
    db: int = Field(0, ge=0, description="Redis database number.")
    socket_timeout: float = Field(10.0, gt=0, description="Seconds before a Redis command is considered failed.")
    max_connections: int = Field(
        64,
        ge=1,
        le=10_000,
        description=(
            "Connections one process keeps to Redis at most (its pool); a caller finding them all busy "
            "waits up to pool-timeout-seconds, then gets a temporary failure."
        ),
    )
    pool_timeout_seconds: float = Field(
        5.0, gt=0, description="Longest wait for a free pooled connection when all max-connections are busy."
    )

    @model_validator(mode="after")
    def _strong_password(self) -> RedisServer:
        password = secret_text(self.password)
        if password is not None and len(password) < MIN_REDIS_PASSWORD and not is_loopback_host(self.hostname):
            raise ValueError(
                f"password: {len(password)} characters; at least {MIN_REDIS_PASSWORD} are required when Redis "
                f"is not on loopback (hostname {self.hostname!r}); {GENERATE_HINT}"
            )
        return self


class ReliableQueueClient(StrictModel):
    """The ``reliable-queue`` block of a service section."""

    redis: RedisServer = Field(default_factory=RedisServer)


class Prometheus(StrictModel):
    """Where a service serves ``/metrics``, ``/healthz`` and ``/readyz``."""

    inet_interface: str = Field("0.0.0.0", description="Listen address of the metrics server.")
    inet_port: int = Field(9090, ge=0, le=65535, description="Listen port of the metrics server.")


class Bind(StrictModel):
    """A listening socket (``bind.inet-interface`` / ``bind.inet-port``)."""

    inet_interface: str = Field("0.0.0.0", description="Listen address.")
    inet_port: int = Field(..., ge=0, le=65535, description="Listen port.")


class AuthLogin(StrictModel):
    """One submission account.  ``password`` is plain text or a ``pbkdf2_sha256$…`` hash."""

    username: str = Field(..., min_length=1)
    password: SecretStr = Field(..., description="Plain password or pbkdf2_sha256$<iter>$<salt>$<hash>.")


class AuthLockout(StrictModel):
    """Brute-force protection for password logins, per client address (kept in Redis)."""

    max_failures: int = Field(5, ge=1, description="Failed logins allowed within window-seconds.")
    window_seconds: float = Field(300.0, gt=0, description="Window in which failures are counted.")
    lockout_seconds: float = Field(900.0, ge=0, description="How long an address is refused after that.")


class SmtpAuthLockout(AuthLockout):
    """:class:`AuthLockout` plus a delay on every failed SMTP AUTH reply."""

    delay_seconds: float = Field(1.0, ge=0, description="Delay added to every failed AUTH reply.")


class SmtpLimits(StrictModel):
    """Connection and session limits of an SMTP listener (Receiver, MxServer).

    A client over a limit gets ``421 4.7.0`` and is disconnected; each refusal is counted by
    reason.  The idle timeout is reset by every command, so a client that keeps sending NOOP is
    still ended by ``max-session-seconds``.
    """

    max_connections: int = Field(
        500, ge=1, description="Concurrent SMTP sessions of the pod (shared out over its worker processes)."
    )
    max_connections_per_ip: int = Field(
        20, ge=1, description="Concurrent SMTP sessions from one client address (in each worker process)."
    )
    idle_timeout_seconds: float = Field(
        300.0, gt=0, description="A session waiting this long for the client's next command is closed (421)."
    )
    busy_idle_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="The idle timeout while more than half of max-connections are in use (as Postfix under stress).",
    )
    max_session_seconds: float = Field(
        1800.0, gt=0, description="Longest session; a transaction in progress is finished first."
    )
