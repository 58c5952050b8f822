"""Building blocks shared by every configuration section.

All models are strict (unknown keys are errors), frozen (config is read once in ``main`` and
passed down) and use the original kebab-case key names (``inet-port``), mapped to snake_case
attributes.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

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


def split_address(address: str, default_port: int) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``; the port may be left out) as a (host, port) pair.

    Raises:
        ValueError: not a host name or address with an optional port in 1-65535.
    """
    text = address.strip()
    host, port_text, has_port = text, "", False
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"{address!r} is not host:port")
        port_text, has_port = rest[1:], bool(rest)
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        has_port = True
    if not host or any(ch.isspace() for ch in host):
        raise ValueError(f"{address!r} is not host:port")
    if not has_port:
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{address!r}: the port must be a number in 1-65535")
    return host, int(port_text)


#: Where Sentinel listens unless an address says otherwise.
SENTINEL_PORT: Final = 26379


class SentinelSettings(StrictModel):
    """Redis Sentinel: the clients ask the sentinels which node is the primary (DESIGN §8).

    Replaces ``hostname``/``port``: every connection goes to the primary the sentinels name
    now, so clients follow a failover by themselves.
    """

    master_name: str = Field(
        ..., min_length=1, description="Name the sentinels monitor the primary under (sentinel monitor <name> ...)."
    )
    addresses: list[str] = Field(
        ...,
        min_length=1,
        description="The sentinels, host:port each (port default 26379); any one that answers is enough.",
    )
    username: str | None = Field(None, description="User on the sentinels, when they have ACL users of their own.")
    password: SecretStr | None = Field(
        None, description="Password of the sentinels (their requirepass; not the data nodes' password)."
    )
    socket_timeout: float = Field(1.0, gt=0, description="Seconds before a sentinel that does not answer is skipped.")

    @field_validator("addresses")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            split_address(address, SENTINEL_PORT)
        return value

    def hosts(self) -> list[tuple[str, int]]:
        """The sentinels as (host, port) pairs."""
        return [split_address(a, SENTINEL_PORT) for a in self.addresses]


class RedisServer(StrictModel):
    """Where a service finds Redis (``<service>.reliable-queue.redis``)."""

    hostname: str = Field("redis", description="Redis host name or IP address (unused with sentinel).")
    port: int = Field(6379, ge=1, le=65535, description="Redis TCP port (unused with sentinel).")
    sentinel: SentinelSettings | None = Field(
        None, description="Find the primary through Redis Sentinel instead of hostname/port (deploy/ha)."
    )
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
    wait_replicas: int | None = Field(
        None,
        ge=0,
        le=100,
        description=(
            "Replicas that must confirm a submission (WAIT) before the receivers answer 250/200; "
            "default 1 with sentinel, else 0 (no WAIT)."
        ),
    )
    wait_timeout_seconds: float = Field(
        1.0,
        gt=0,
        le=60,
        description="Longest WAIT for the replicas; then a temporary failure (451/503) and the client retries.",
    )

    @property
    def replica_acks(self) -> int:
        """Replicas a producer's WAIT asks for (0: no WAIT)."""
        if self.wait_replicas is not None:
            return self.wait_replicas
        return 1 if self.sentinel is not None else 0

    def on_loopback(self) -> bool:
        """True when every address a client connects to is a loopback address."""
        if self.sentinel is not None:
            return all(is_loopback_host(host) for host, _ in self.sentinel.hosts())
        return is_loopback_host(self.hostname)

    @model_validator(mode="after")
    def _strong_password(self) -> RedisServer:
        password = secret_text(self.password)
        if password is not None and len(password) < MIN_REDIS_PASSWORD and not self.on_loopback():
            where = "the sentinels" if self.sentinel is not None else f"hostname {self.hostname!r}"
            raise ValueError(
                f"password: {len(password)} characters; at least {MIN_REDIS_PASSWORD} are required when Redis "
                f"is not on loopback ({where}); {GENERATE_HINT}"
            )
        if self.sentinel is not None:
            sentinel_password = secret_text(self.sentinel.password)
            if sentinel_password is not None and len(sentinel_password) < MIN_REDIS_PASSWORD and not self.on_loopback():
                raise ValueError(
                    f"sentinel.password: {len(sentinel_password)} characters; at least {MIN_REDIS_PASSWORD} are "
                    f"required when the sentinels are not on loopback; {GENERATE_HINT}"
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
