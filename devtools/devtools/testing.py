"""Configuration builders shared by the test suite, the benchmarks and the local stack.

:func:`customer_config` returns a complete customer file (as a dict) for one machine: every
listener on loopback, Redis on the given port, one sending domain with a fresh DKIM key.
Tests override what they need with :func:`merge` and write both files with
:func:`write_configs`.
"""

from __future__ import annotations

import copy
import functools
import secrets
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from common.dkimkeys import generate_ed25519_seed, generate_rsa_pem

SENDER_DOMAIN = "example.test"
RETURN_PATH_DOMAIN = "bounces.example.test"
SELECTOR = "mailer"
RECEIVER_USER = "app"
RECEIVER_PASSWORD = "correct horse battery staple"
#: Services with a Redis user of their own (as common.redisacl.SERVICES).
REDIS_SERVICES = ("receiver", "httpreceiver", "transformer", "postfixlog", "mxserver", "backdata")
#: ``common-config.address-secret`` of test configurations (32 bytes at least, as required).
ADDRESS_SECRET = "test-address-secret-0123456789abcdef"


@functools.cache
def rsa_pem(bits: int = 2048, index: int = 0) -> bytes:
    """A cached RSA key (generating 2048-bit keys costs ~0.1 s each)."""
    del index  # only makes distinct cache entries
    return generate_rsa_pem(bits)


@functools.cache
def ed25519_seed(index: int = 0) -> bytes:
    """A cached ed25519 seed (base64)."""
    del index
    return generate_ed25519_seed()


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``override`` into a copy of ``base``; a None value deletes the key."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def write_key(directory: Path, domain: str = SENDER_DOMAIN, bits: int = 2048) -> Path:
    """Write the cached RSA key for ``domain`` to ``directory``; returns its path."""
    path = directory / f"dkim-{domain}.pem"
    path.write_bytes(rsa_pem(bits))
    return path


def customer_config(
    directory: Path,
    *,
    redis_port: int,
    ports: Mapping[str, int] | None = None,
    webhook_url: str = "http://127.0.0.1:8099/events",
) -> dict[str, Any]:
    """A complete customer file for one machine (loopback everywhere)."""
    ports = dict(ports or {})
    key = write_key(directory)
    redis_block = {"redis": {"hostname": "127.0.0.1", "port": redis_port}}

    def metrics(name: str) -> dict[str, Any]:
        return {"inet-interface": "127.0.0.1", "inet-port": ports.get(f"{name}-metrics", 0)}

    return {
        "common-config": {
            "redis": {"hostname": "127.0.0.1", "port": redis_port},
            "address-secret": ADDRESS_SECRET,
        },
        "receiver": {
            "bind": {"inet-interface": "127.0.0.1", "inet-port": ports.get("receiver", 0)},
            "auth-logins": [{"username": RECEIVER_USER, "password": RECEIVER_PASSWORD}],
            "reliable-queue": redis_block,
            "prometheus": metrics("receiver"),
            "hostname": "receiver.test",
        },
        "httpreceiver": {
            "bind": {
                "inet-interface": "127.0.0.1",
                "inet-port": ports.get("httpreceiver", 0),
                "inet-port-metrics": ports.get("httpreceiver-metrics", 0),
            },
            "auth-logins": [{"username": RECEIVER_USER, "password": RECEIVER_PASSWORD}],
            "reliable-queue": redis_block,
        },
        "transformer": {
            "reliable-queue": redis_block,
            "domain-settings": [
                {
                    "domain": SENDER_DOMAIN,
                    "dkim-private-key-file": str(key),
                    "return-path-domain": RETURN_PATH_DOMAIN,
                    "selector": SELECTOR,
                }
            ],
            "feedback-id": {"campaign-id": "campaign", "mail-type": "transactional", "sender-id": "sender"},
            "prometheus": metrics("transformer"),
        },
        "postfixlog": {
            "reliable-queue": redis_block,
            "prometheus": metrics("postfixlog"),
            "postfix": {"hostname": "127.0.0.1", "port": ports.get("postfix", 10025)},
            "string-replacer": {
                "main-cf": {"myhostname": "mta.example.test", "mailname": SENDER_DOMAIN},
                "master-cf": {"smtpd-port": ports.get("postfix", 10025)},
            },
            "sandbox": {"enabled": True, "nexthop": f"[127.0.0.1]:{ports.get('sink', 2526)}"},
            "instance-directory": str(directory / "postfix"),
        },
        "mxserver": {
            "bind": {"inet-interface": "127.0.0.1", "inet-port": ports.get("mxserver", 0)},
            "eml-directory": str(directory / "eml"),
            "abuse": {"addresses": [f"fbl@{RETURN_PATH_DOMAIN}"]},
            "reliable-queue": redis_block,
            "prometheus": metrics("mxserver"),
            "hostname": "mx.example.test",
        },
        "backdata": {
            "reliable-queue": redis_block,
            "post-url": webhook_url,
            "prometheus": metrics("backdata"),
        },
        "redis": {"reliable-queue": redis_block, "prometheus": metrics("redis")},
    }


def redis_users(services: tuple[str, ...] = REDIS_SERVICES) -> dict[str, Any]:
    """A customer-file override giving each service its own Redis ACL user and a fresh password.

    ``common.redisacl`` turns these into ``user`` lines; the local stack and the least-privilege
    tests run Redis with them.
    """
    return {
        service: {"reliable-queue": {"redis": {"username": service, "password": secrets.token_urlsafe(24)}}}
        for service in services
    }


def global_config() -> dict[str, Any]:
    """The global file with its documented defaults spelled out."""
    return {
        "reliable-queue": {"queue-names": {"primary-queue": "IB-MAIL-QUEUE-P0", "default-queue": "IB-MAIL-QUEUE-P1"}},
        "backdata": {"queue-name": "EVENT_QUEUE"},
        "transformer": {"x-mailer": "Inboxbooster-Mailer"},
        "postfix": {"incoming-queue-name": "INCOMING-TO-POSTFIX"},
    }


def write_configs(
    directory: Path, customer: Mapping[str, Any], global_: Mapping[str, Any] | None = None
) -> tuple[Path, Path]:
    """Write both files into ``directory``; returns (global path, customer path)."""
    directory.mkdir(parents=True, exist_ok=True)
    global_path = directory / "inboxbooster-mailer-global.yaml"
    customer_path = directory / "inboxbooster-mailer-customer.yaml"
    global_path.write_text(yaml.safe_dump(dict(global_ or global_config()), sort_keys=False))
    customer_path.write_text(yaml.safe_dump(dict(customer), sort_keys=False))
    return global_path, customer_path


def service_command(module: str, global_path: Path, customer_path: Path, *extra: str) -> list[str]:
    """The command line running ``python -m <module>`` of this environment on both config files."""
    return [
        sys.executable,
        "-m",
        module,
        "--global-config-file",
        str(global_path),
        "--customer-config-file",
        str(customer_path),
        *extra,
    ]
