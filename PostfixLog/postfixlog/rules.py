"""Traffic-shaping rules: the file shipped with PostfixLog, customer overrides, Postfix' rendering.

Read once at start (``build``, so ``--check-config`` sees every problem): ``shaping.yaml`` next
to this module (or ``postfixlog.shaping.rules-file``), with the customer file's
``postfixlog.shaping.default`` / ``backoff`` / ``providers`` / ``warmup`` merged over it key by
key, then validated as one.  A problem names the file and key it comes from::

    /configs/inboxbooster-mailer-customer.yaml: postfixlog.shaping.providers.google.connections: …
    /usr/lib/…/postfixlog/shaping.yaml: providers.orange.slow-down[0]: not a regular expression …

What the rules become:

* in Postfix (:func:`render_main_cf`, :func:`render_master_cf`, :func:`render_header_checks`):
  one ``smtp`` transport per provider, ``ib_<provider>``, plus ``ib_default`` for every other
  domain, each with its limits; ``ib_<provider>_u8`` twins for mail that needs SMTPUTF8 (a new
  connection per message: see main.cf.in); header_checks that turn PostfixLog's routing header
  (:mod:`postfixlog.routing`) into ``FILTER ib_<provider>:``;
* in PostfixLog: provider resolution (:mod:`postfixlog.providers`) and the rate, back-off and
  warm-up (:mod:`postfixlog.shaping`).
"""

from __future__ import annotations

import copy
import datetime
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml
from pydantic import Field, ValidationError, field_validator

from common.config.base import StrictModel
from common.config.postfixlog import Shaping
from common.errors import ConfigError

SHIPPED: Final = Path(__file__).with_name("shaping.yaml")
#: Route of every domain that belongs to no listed provider.
DEFAULT_ROUTE: Final = "default"
_PROVIDER_NAME: Final = re.compile(r"^[a-z0-9][a-z0-9.-]{0,62}$")
_POSTFIX_TIME: Final = re.compile(r"^\d+[smhdw]?$")
#: header_checks rule of mail that needs SMTPUTF8 and carries no routing header (main.cf.in).
EIGHT_BIT_RULE: Final = "/[^[:space:] -~]/ FILTER smtputf8:"
_OVERRIDABLE: Final = ("default", "backoff", "providers", "warmup")


def _patterns(values: list[str] | None) -> list[str] | None:
    for value in values or ():
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {value!r} ({exc})") from None
    return values


class ProviderRule(StrictModel):
    """One provider's rule; a key left out comes from ``default``."""

    mx: list[str] | None = Field(None, description="Shell patterns of the provider's MX host names.")
    domains: list[str] | None = Field(None, description="Recipient domains of the provider (no MX lookup).")
    connections: int | None = Field(None, ge=1, le=1000, description="Concurrent deliveries (per instance).")
    messages_per_connection: int | None = Field(None, ge=0, description="Deliveries per connection; 0 = no limit.")
    recipients_per_message: int | None = Field(None, ge=2, le=1000, description="_destination_recipient_limit.")
    rate_per_minute: float | None = Field(None, ge=0, description="Messages per minute, all instances; 0 = no limit.")
    rate_delay: str | None = Field(None, description='Postfix _destination_rate_delay, e.g. "5s".')
    failed_cohort_limit: int | None = Field(None, ge=1, description="_destination_concurrency_failed_cohort_limit.")
    backoff: bool | None = Field(None, description="Pause automatically on slow-down and stop answers.")
    slow_down: list[str] | None = Field(None, description="Regular expressions of 'slow down' answers.")
    stop: list[str] | None = Field(None, description="Regular expressions of 'stop' answers (blocklisting).")

    @field_validator("slow_down", "stop")
    @classmethod
    def _regexes(cls, value: list[str] | None) -> list[str] | None:
        return _patterns(value)

    @field_validator("rate_delay")
    @classmethod
    def _time(cls, value: str | None) -> str | None:
        if value is not None and not _POSTFIX_TIME.match(value):
            raise ValueError(f'not a Postfix time such as "5s" or "1m": {value!r}')
        return value

    @field_validator("mx", "domains")
    @classmethod
    def _lower(cls, value: list[str] | None) -> list[str] | None:
        return [v.strip().lower().rstrip(".") for v in value] if value is not None else None


class Backoff(StrictModel):
    """Automatic back-off (see shaping.yaml)."""

    threshold: int = Field(5, ge=1)
    window_seconds: float = Field(60.0, gt=0)
    pause_seconds: float = Field(300.0, gt=0)
    max_pause_seconds: float = Field(3600.0, gt=0)
    stop_pause_seconds: float = Field(3600.0, gt=0)
    resume_factor: float = Field(0.25, gt=0, le=1)
    resume_rate_per_minute: float = Field(60.0, gt=0)
    ramp_step_seconds: float = Field(300.0, gt=0)
    ramp_steps: int = Field(4, ge=0, le=20)


class Warmup(StrictModel):
    """Daily volume ramp of one sending domain."""

    start: datetime.date
    daily: list[int] = Field(..., min_length=1)

    @field_validator("daily")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(v < 1 for v in value):
            raise ValueError("every day's volume must be at least 1")
        return value

    def limit(self, day: datetime.date) -> int | None:
        """Messages allowed on ``day`` (None: the ramp is over)."""
        index = max((day - self.start).days, 0)
        return self.daily[index] if index < len(self.daily) else None


class RulesFile(StrictModel):
    """The whole rules file."""

    default: ProviderRule
    backoff: Backoff = Field(default_factory=Backoff)
    providers: dict[str, ProviderRule] = Field(default_factory=dict)
    warmup: dict[str, Warmup] = Field(default_factory=dict)

    @field_validator("providers")
    @classmethod
    def _names(cls, value: dict[str, ProviderRule]) -> dict[str, ProviderRule]:
        for name, rule in value.items():
            if not _PROVIDER_NAME.match(name) or name == DEFAULT_ROUTE:
                raise ValueError(f"{name!r} is not a provider name (lower-case letters, digits, '.', '-')")
            if not rule.mx and not rule.domains:
                raise ValueError(f"{name}: give mx patterns or domains (or both)")
        seen: dict[str, str] = {}
        for name in value:
            other = seen.setdefault(transport_name(name), name)
            if other != name:
                raise ValueError(f"{other!r} and {name!r} would share the Postfix transport {transport_name(name)}")
        return value


@dataclass(frozen=True)
class Limits:
    """The complete rule of one provider (``default`` filled in)."""

    name: str
    mx: tuple[str, ...]
    domains: tuple[str, ...]
    connections: int
    messages_per_connection: int
    recipients_per_message: int
    rate_per_minute: float
    rate_delay: str
    failed_cohort_limit: int
    backoff: bool
    slow_down: tuple[re.Pattern[str], ...]
    stop: tuple[re.Pattern[str], ...]

    @property
    def transport(self) -> str:
        """The Postfix transport of this provider."""
        return transport_name(self.name)

    def classify(self, reply: str) -> str | None:
        """``stop``, ``slow`` or None for a remote server's answer."""
        if any(p.search(reply) for p in self.stop):
            return "stop"
        if any(p.search(reply) for p in self.slow_down):
            return "slow"
        return None


@dataclass(frozen=True)
class Rules:
    """Validated rules: every provider's limits, back-off, warm-up."""

    default: Limits
    providers: Mapping[str, Limits]
    backoff: Backoff
    warmup: Mapping[str, Warmup]
    enabled: bool = True

    def limits(self, provider: str) -> Limits:
        """The limits of ``provider`` (a listed one, or a domain: the default rule)."""
        return self.providers.get(provider) or self.default

    def route(self, provider: str) -> str:
        """The routing-header value of ``provider``: its name, or ``default``."""
        return provider if provider in self.providers else DEFAULT_ROUTE

    def ramp_seconds(self, provider: str) -> float:
        """How long a resumed provider takes to get back to full speed."""
        rate = self.limits(provider).rate_per_minute
        steps = math.ceil(math.log2(1 / self.backoff.resume_factor)) if rate else self.backoff.ramp_steps
        return steps * self.backoff.ramp_step_seconds


def transport_name(provider: str) -> str:
    """Postfix transport (master.cf service and main.cf parameter prefix) of a provider."""
    return "ib_" + re.sub(r"[^a-z0-9]", "_", provider)


def _limits(name: str, rule: ProviderRule, default: ProviderRule) -> Limits:
    def pick(field: str) -> Any:
        value = getattr(rule, field)
        return value if value is not None else getattr(default, field)

    flags = re.IGNORECASE
    return Limits(
        name=name,
        mx=tuple(rule.mx or ()),
        domains=tuple(rule.domains or ()),
        connections=pick("connections"),
        messages_per_connection=pick("messages_per_connection"),
        recipients_per_message=pick("recipients_per_message"),
        rate_per_minute=float(pick("rate_per_minute")),
        rate_delay=pick("rate_delay"),
        failed_cohort_limit=pick("failed_cohort_limit"),
        backoff=bool(pick("backoff")),
        slow_down=tuple(re.compile(p, flags) for p in pick("slow_down")),
        stop=tuple(re.compile(p, flags) for p in pick("stop")),
    )


#: Keys the default rule must set (a provider may leave them out).
_REQUIRED_DEFAULT: Final = (
    "connections",
    "messages_per_connection",
    "recipients_per_message",
    "rate_per_minute",
    "rate_delay",
    "failed_cohort_limit",
    "backoff",
    "slow_down",
    "stop",
)


def _merge(base: Any, override: Any) -> Any:
    """``override`` merged into ``base`` key by key; a None value deletes the key."""
    if not isinstance(base, dict) or not isinstance(override, dict):
        return copy.deepcopy(override)
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(out.get(key), value)
    return out


def _child(node: Any, part: str | int) -> tuple[bool, Any]:
    if isinstance(node, dict) and part in node:
        return True, node[part]
    if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
        return True, node[part]
    return False, None


def _has(data: Any, loc: tuple[str | int, ...]) -> bool:
    node = data
    for part in loc:
        found, node = _child(node, part)
        if not found:
            return False
    return True


def _dotted(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def load_rules(section: Shaping, customer_path: Path, *, shipped: Path = SHIPPED) -> Rules:
    """The rules file with the customer's overrides, validated.

    Raises:
        ConfigError: one line per problem, naming the file (rules file or customer file) and key.
    """
    path = section.rules_file or shipped
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError([f"{path}: cannot read the shaping rules: {exc}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of keys"])
    overrides = {k: getattr(section, k) for k in _OVERRIDABLE if getattr(section, k)}
    merged = _merge(data, overrides)
    where = "postfixlog.shaping"
    try:
        parsed = RulesFile.model_validate(merged)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            loc = _real_loc(tuple(err["loc"]), merged)
            key = _dotted(loc) or "(top level)"
            message = err["msg"].removeprefix("Value error, ")
            message = message[:1].lower() + message[1:]
            if err["type"] == "extra_forbidden":
                message = "unknown key"
            if loc and _has(overrides, loc):
                problems.append(f"{customer_path}: {where}.{key}: {message}")
            else:
                problems.append(f"{path}: {key}: {message}")
        raise ConfigError(problems) from None
    missing = [k.replace("_", "-") for k in _REQUIRED_DEFAULT if getattr(parsed.default, k) is None]
    if missing:
        raise ConfigError([f"{path}: default: every provider's fallback needs {', '.join(missing)}"])
    return Rules(
        default=_limits(DEFAULT_ROUTE, parsed.default, parsed.default),
        providers={name: _limits(name, rule, parsed.default) for name, rule in parsed.providers.items()},
        backoff=parsed.backoff,
        warmup={domain.lower(): w for domain, w in parsed.warmup.items()},
        enabled=section.enabled,
    )


def _real_loc(loc: tuple[str | int, ...], data: Any) -> tuple[str | int, ...]:
    """``loc`` without pydantic's type tags (``function-after[…]``); a missing key ends it."""
    kept: list[str | int] = []
    node = data
    for part in loc:
        found, child = _child(node, part)
        if found:
            kept.append(part)
            node = child
        elif isinstance(node, dict | list):
            kept.append(part)
            break
    return tuple(kept)


# -- Postfix ---------------------------------------------------------------------------------------


def _all(rules: Rules) -> list[Limits]:
    return [rules.default, *rules.providers.values()] if rules.enabled else []


def render_main_cf(rules: Rules) -> str:
    """main.cf lines of every provider transport (empty when shaping is off)."""
    lines = []
    for limits in _all(rules):
        t = limits.transport
        lines += [
            f"# {limits.name}",
            f"{t}_destination_concurrency_limit = {limits.connections}",
            f"{t}_initial_destination_concurrency = {min(5, limits.connections)}",
            f"{t}_destination_recipient_limit = {limits.recipients_per_message}",
            f"{t}_destination_rate_delay = {limits.rate_delay}",
            f"{t}_destination_concurrency_failed_cohort_limit = {limits.failed_cohort_limit}",
        ]
    return "\n".join(lines) + ("\n" if lines else "")


def render_master_cf(rules: Rules) -> str:
    """master.cf services of every provider transport and its SMTPUTF8 twin."""
    lines = []
    for limits in _all(rules):
        t = limits.transport
        lines += [
            f"{t} unix - - n - {limits.connections} smtp",
            f"        -o syslog_name=postfix/{t}",
            f"        -o smtp_connection_reuse_count_limit={limits.messages_per_connection}",
            f"{t}_u8 unix - - n - {limits.connections} smtp",
            f"        -o syslog_name=postfix/{t}_u8",
            "        -o smtp_connection_cache_on_demand=no",
        ]
    return "\n".join(lines) + ("\n" if lines else "")


def render_header_checks(rules: Rules, header: str) -> str:
    """header_checks: the routing header -> FILTER to the provider's transport; 8-bit -> smtputf8.

    Only the message's own header is checked for the routing header (mime_header_checks and
    nested_header_checks get :func:`render_body_header_checks`), so an attached message cannot
    choose a transport.
    """
    lines = []
    for limits in _all(rules):
        value = limits.name.replace(".", r"\.")  # names are [a-z0-9.-]: only the dot is special
        lines.append(f"/^{header}: {value}$/ FILTER {limits.transport}:")
        lines.append(f"/^{header}: {value} utf8$/ FILTER {limits.transport}_u8:")
    lines.append(EIGHT_BIT_RULE)
    return "\n".join(lines) + "\n"


def render_body_header_checks() -> str:
    """mime_header_checks and nested_header_checks: only the SMTPUTF8 rule."""
    return EIGHT_BIT_RULE + "\n"
