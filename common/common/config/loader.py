"""Read, expand and validate both configuration files; report every problem on its own line.

Each problem line names the file and the key path, e.g.::

    configs/inboxbooster-mailer-customer.yaml: receiver.bind.inet-port: not a valid integer (got 'six')

String values of the form ``${env:NAME}`` or ``${file:/path}`` are replaced by the environment
variable or the file's content (trailing newline removed), so secrets can live in a Kubernetes
Secret instead of the ConfigMap.

Least privilege (DESIGN §8): every pod reads the same customer file but mounts only the secrets
its service uses.  A service resolves the references under the key paths it reads
(:data:`READS`) and must find them; a reference elsewhere is resolved when its file or variable
is there, and otherwise becomes an :class:`~common.config.base.UnresolvedSecret` that fails
loudly if anything ever reads it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml
from pydantic import BaseModel, ValidationError

from common.config.base import REFERENCE, RedisServer, UnresolvedSecret
from common.config.customer import CustomerConfig
from common.config.globalfile import GlobalConfig
from common.config.transformer import TransformerSection
from common.errors import ConfigError

DEFAULT_GLOBAL_FILE: Final = Path("/configs/inboxbooster-mailer-global.yaml")
DEFAULT_CUSTOMER_FILE: Final = Path("/configs/inboxbooster-mailer-customer.yaml")

#: Customer-file sections each service needs (its own first).
REQUIRED_SECTIONS: Final[Mapping[str, tuple[str, ...]]] = {
    "receiver": ("receiver", "transformer"),
    "httpreceiver": ("httpreceiver", "transformer"),
    "transformer": ("transformer",),
    "postfixlog": ("postfixlog",),
    "mxserver": ("mxserver", "transformer"),
    "backdata": ("backdata",),
    "redis": ("redis",),
    "redis-sentinel": ("redis",),
}

#: Customer-file key paths whose ``${…}`` references each service resolves ("*": any section).
#: The pod of a service mounts exactly the secrets referenced under these paths.
READS: Final[Mapping[str, tuple[str, ...]]] = {
    "receiver": ("receiver", "transformer.domain-settings", "common-config.redis"),
    "httpreceiver": (
        "httpreceiver",
        "transformer.domain-settings",
        "common-config.redis",
        "common-config.address-secret",
    ),
    "transformer": ("transformer", "common-config.redis", "common-config.address-secret"),
    "postfixlog": ("postfixlog", "common-config.redis"),
    "mxserver": ("mxserver", "transformer.domain-settings", "common-config.redis", "common-config.address-secret"),
    "backdata": ("backdata", "common-config.redis"),
    # The Redis pod: its own section, the backups, and every service's Redis user (ACL).
    "redis": ("redis", "common-config.redis", "common-config.object-storage", "*.reliable-queue.redis"),
    # A Sentinel pod (deploy/ha): its own password and the one it logs in to the data nodes with.
    "redis-sentinel": ("redis.sentinel", "redis.replication.sentinel-password", "common-config.redis.sentinel"),
}

_SECRET_WORDS = ("password", "secret", "key", "token")


@dataclass(frozen=True)
class Config:
    """Both files, validated.  Built once in ``main`` and passed down (never a global)."""

    global_: GlobalConfig
    customer: CustomerConfig
    global_path: Path
    customer_path: Path

    @property
    def config_dir(self) -> Path:
        """Directory of the customer file; relative file names in it are resolved from here."""
        return self.customer_path.parent

    def resolve(self, path: Path) -> Path:
        """Absolute path of a file named in the customer file."""
        return path if path.is_absolute() else self.config_dir / path

    def redis_for(self, service: str) -> RedisServer:
        """Redis settings of a service.

        ``common-config.redis`` (else the defaults) with what the service's own
        ``reliable-queue.redis`` sets on top (typically its ACL user and password).
        """
        shared = self.customer.common_config.redis or RedisServer()
        section = getattr(self.customer, service, None)
        client = getattr(section, "reliable_queue", None)
        if client is None:
            return shared
        own: RedisServer = client.redis
        return shared.model_copy(update={name: getattr(own, name) for name in own.model_fields_set})

    @property
    def transformer(self) -> TransformerSection:
        """The transformer section (present whenever a service that needs it has started)."""
        section = self.customer.transformer
        if section is None:
            raise ConfigError([f"{self.customer_path}: transformer: section is missing"])
        return section


def load_config(
    global_path: Path | str = DEFAULT_GLOBAL_FILE,
    customer_path: Path | str = DEFAULT_CUSTOMER_FILE,
    *,
    service: str | None = None,
) -> Config:
    """Load both files and check what ``service`` needs (every check when ``service`` is None).

    Raises:
        ConfigError: with one line per problem, naming file and key path.
    """
    global_path, customer_path = Path(global_path), Path(customer_path)
    problems: list[str] = []
    global_cfg = _load_model(global_path, GlobalConfig, problems, _Scope(None))
    customer_cfg = _load_model(customer_path, CustomerConfig, problems, _Scope(service))
    if isinstance(customer_cfg, CustomerConfig):
        problems.extend(_check_customer(customer_cfg, customer_path, service))
    if problems or not isinstance(global_cfg, GlobalConfig) or not isinstance(customer_cfg, CustomerConfig):
        raise ConfigError(problems)
    return Config(global_cfg, customer_cfg, global_path, customer_path)


@dataclass(frozen=True)
class _Scope:
    """Which references a service must resolve (:data:`READS`; None: every one)."""

    service: str | None

    def requires(self, where: tuple[str | int, ...]) -> bool:
        if self.service is None or self.service not in READS:
            return True
        keys = [part for part in where if isinstance(part, str)]
        return any(_under(keys, read.split(".")) for read in READS[self.service])


def _under(keys: list[str], prefix: list[str]) -> bool:
    return len(keys) >= len(prefix) and all(p in ("*", k) for p, k in zip(prefix, keys, strict=False))


def _load_model(path: Path, model: type[BaseModel], problems: list[str], scope: _Scope) -> BaseModel | None:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        problems.append(f"{path}: cannot read file: {exc.strerror or exc}")
        return None
    except UnicodeDecodeError as exc:
        problems.append(f"{path}: not UTF-8 text: {exc.reason} at byte {exc.start}")
        return None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
        problems.append(f"{path}: invalid YAML: {where}{getattr(exc, 'problem', None) or exc}")
        return None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{path}: the top level must be a mapping of keys, not {type(data).__name__}")
        return None
    before = len(problems)
    data = _expand(data, (), path, problems, scope)
    if len(problems) > before:
        return None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems.extend(_describe(exc, data, path))
        return None


def _expand(value: Any, where: tuple[str | int, ...], path: Path, problems: list[str], scope: _Scope) -> Any:
    """Replace ``${env:NAME}`` / ``${file:PATH}`` strings, recursively."""
    if isinstance(value, dict):
        return {k: _expand(v, (*where, str(k)), path, problems, scope) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, (*where, i), path, problems, scope) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value
    match = REFERENCE.match(value.strip())
    if match is None:
        return value
    kind, name = match.group(1), match.group(2).strip()
    if kind == "env":
        if name in os.environ:
            return os.environ[name]
        problem = f"environment variable {name} is not set"
    else:
        try:
            return Path(name).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            problem = f"cannot read {name}: {exc.strerror or exc}"
    if scope.requires(where):
        problems.append(f"{path}: {_dotted(where)}: {problem}")
        return value
    return UnresolvedSecret(f"{path}: {_dotted(where)}: {value.strip()}")


def _dotted(loc: Iterable[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "(top level)"


def _real_loc(loc: tuple[str | int, ...], data: Any) -> tuple[tuple[str | int, ...], bool]:
    """Drop pydantic's union/type tags from ``loc``; report whether the full path exists."""
    kept: list[str | int] = []
    node: Any = data
    exists = True
    for part in loc:
        found, child = _child(node, part)
        if found:
            kept.append(part)
            node = child
        elif isinstance(node, dict | list):
            # A key that is absent (missing field): keep it, the path ends here.
            kept.append(part)
            exists = False
            node = None
        # else: a type tag such as 'int' or 'function-after[...]'; skip it
    return tuple(kept), exists


def _child(node: Any, part: str | int) -> tuple[bool, Any]:
    if isinstance(node, dict) and part in node:
        return True, node[part]
    if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
        return True, node[part]
    return False, None


_MESSAGES: Final = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
}


def _describe(exc: ValidationError, data: Any, path: Path) -> list[str]:
    lines: list[str] = []
    seen: set[str] = set()
    for err in exc.errors(include_url=False):
        loc, _ = _real_loc(tuple(err["loc"]), data)
        key = _dotted(loc)
        if key in seen:
            continue
        seen.add(key)
        message = _MESSAGES.get(err["type"]) or _clean(err["msg"])
        shown = err.get("input")
        secret = any(word in key.lower() for word in _SECRET_WORDS)
        if err["type"] not in _MESSAGES and not secret and isinstance(shown, str | int | float | bool):
            message += f" (got {shown!r})"
        # A whole-file check (model validator) names its keys in the message itself.
        lines.append(f"{path}: {key}: {message}" if loc else f"{path}: {message}")
    return lines


def _clean(msg: str) -> str:
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return msg[:1].lower() + msg[1:]


def _check_customer(cfg: CustomerConfig, path: Path, service: str | None) -> list[str]:
    problems: list[str] = []
    services = [service] if service else []
    for svc in services:
        for section in REQUIRED_SECTIONS.get(svc, ()):
            if getattr(cfg, section) is None:
                problems.append(f"{path}: {section}: section is missing (required by {svc})")
    if cfg.transformer is not None and service in (None, "transformer"):
        problems.extend(_check_dkim_keys(cfg.transformer, path))
    return problems


def _check_dkim_keys(section: TransformerSection, path: Path) -> list[str]:
    # Imported here: only the Transformer (and --check-config) pays for loading key material.
    from common.dkimkeys import load_domain_keys

    return load_domain_keys(section, path)[1]
