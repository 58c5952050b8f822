"""Least privilege in the manifests: each pod gets exactly the secret keys its service reads.

What a service reads is decided by the code (:data:`common.config.loader.READS`, the key paths
whose ``${file:…}`` references a service resolves) applied to the example customer file
(``configs/``), plus the files its own section names under ``/secrets``.  Each pod's Secret
volume must list exactly those keys -- a key it does not use fails the test, and so does a key
it needs and would not find -- and no secret may reach a container's environment.  The test
prints, per pod, the keys and the Redis ACL user it gets.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.config import load_config
from common.config.loader import READS
from devtools import testing
from tests.infra.repo import MODULES, ROOT, Module, load_yaml, pod_of

EXAMPLE_TEXT = (ROOT / "configs" / "inboxbooster-mailer-customer.yaml").read_text()
EXAMPLE: dict[str, Any] = yaml.safe_load(EXAMPLE_TEXT)
SECRET_REF = re.compile(r"^\$\{file:/secrets/([-._A-Za-z0-9]+)\}$")
SECRET_PATH = re.compile(r"^/secrets/([-._A-Za-z0-9]+)$")
#: Keys of optional features that are commented out in the example (pod -> keys); each must
#: appear in such a comment, so the list cannot drift.
OPTIONAL = {"redis": {"s3-access-key-id", "s3-secret-access-key"}}


def _walk(value: Any, where: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str]]:
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _walk(child, (*where, str(key)))
    elif isinstance(value, list):
        for child in value:
            yield from _walk(child, where)
    elif isinstance(value, str):
        yield where, value


def _under(where: tuple[str, ...], path: str) -> bool:
    prefix = path.split(".")
    return len(where) >= len(prefix) and all(p in ("*", w) for p, w in zip(prefix, where, strict=False))


def needed_keys(module: Module) -> set[str]:
    """Secret keys the module's service reads in the example customer file."""
    out: set[str] = set()
    for where, value in _walk(EXAMPLE):
        ref = SECRET_REF.match(value.strip())
        if ref and any(_under(where, path) for path in READS[module.section]):
            out.add(ref.group(1))
        path = SECRET_PATH.match(value.strip())
        if path and where[0] == module.section:  # key files named by the service's own section
            out.add(path.group(1))
    return out


def mounted_keys(pod: dict[str, Any]) -> set[str]:
    """Keys of the Secret a pod mounts (its volume's items)."""
    volumes = [v for v in pod["spec"]["volumes"] if "secret" in v]
    assert [v["name"] for v in volumes] == ["secrets"]
    items = volumes[0]["secret"].get("items")
    assert items, "the whole Secret is mounted: list the keys this pod needs as items"
    for item in items:
        assert item["path"] == item["key"]
    return {item["key"] for item in items}


def redis_user(module: Module) -> str:
    """The Redis ACL user the module logs in as, in the example customer file."""
    block = (EXAMPLE.get(module.section) or {}).get("reliable-queue", {}).get("redis", {})
    return str(block.get("username") or "default")


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.folder)
def test_each_pod_mounts_exactly_the_secret_keys_its_service_reads(module: Module) -> None:
    pod = pod_of(module)
    mounted, needed = mounted_keys(pod), needed_keys(module)
    optional = OPTIONAL.get(module.pod, set())
    user = redis_user(module)
    print(f"\n{module.pod:12s} Redis user {user:12s} secret keys {sorted(mounted)}")  # noqa: T201 -- the listing
    assert mounted - needed - optional == set(), f"{module.pod} gets keys it does not use"
    assert needed - mounted == set(), f"{module.pod} lacks keys its service reads"
    for key in optional:
        assert re.search(rf"^\s*#.*\$\{{file:/secrets/{re.escape(key)}\}}", EXAMPLE_TEXT, re.M), key


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.folder)
def test_every_service_has_its_own_redis_user(module: Module) -> None:
    # Each service logs in as itself (common.redisacl grants it only its commands and keys);
    # only the Redis pod is the administrator.
    expected = "default" if module.section == "redis" else module.section
    assert redis_user(module) == expected
    block = EXAMPLE[module.section]["reliable-queue"]["redis"]
    password = SECRET_REF.match(block["password"])
    assert password is not None
    assert password.group(1) == ("redis-password" if module.section == "redis" else f"redis-password-{module.section}")


#: The one secret in an environment, because it is needed there: the standard redis_exporter
#: (oliver006/redis_exporter) reads its Redis password only from REDIS_PASSWORD (its
#: --redis.password-file wants a JSON map that no Secret key holds as such).
STANDARD_EXPORTER_PASSWORD = ("redis-exporter", "REDIS_PASSWORD")


def test_no_secret_reaches_a_container_environment() -> None:
    docs = [pod_of(m) for m in MODULES]
    for workload in load_yaml(ROOT / "deploy" / "scaled" / "workloads.yaml"):
        docs.append({"spec": workload["spec"]["template"]["spec"], "metadata": workload["metadata"]})
    for doc in docs:
        for container in doc["spec"]["containers"]:
            assert "envFrom" not in container, doc["metadata"]["name"]
            for env in container.get("env", []):
                if (container["name"], env["name"]) == STANDARD_EXPORTER_PASSWORD:
                    continue
                assert "secretKeyRef" not in env.get("valueFrom", {}), (doc["metadata"]["name"], env["name"])
    assert "${env:" not in "".join(line for line in EXAMPLE_TEXT.splitlines() if not line.lstrip().startswith("#"))


def test_the_example_secret_has_exactly_the_keys_the_pods_mount() -> None:
    (secret,) = load_yaml(ROOT / "deploy" / "secret.example.yaml")
    mounted = set().union(*(mounted_keys(pod_of(m)) for m in MODULES))
    assert set(secret["stringData"]) == mounted


def test_the_check_can_fail() -> None:
    # A pod that mounted the whole Secret, or an extra key, would be caught.
    receiver = next(m for m in MODULES if m.pod == "receiver")
    assert "webhook-secret" not in needed_keys(receiver)
    assert "address-secret" not in needed_keys(receiver)
    assert {"redis-password-receiver", "receiver-password-someuser", "receiver_cert.pem"} <= needed_keys(receiver)
    whole = pod_of(receiver)
    for volume in whole["spec"]["volumes"]:
        volume.get("secret", {}).pop("items", None)
    with pytest.raises(AssertionError, match="the whole Secret is mounted"):
        mounted_keys(whole)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.folder)
def test_each_service_loads_its_configuration_with_only_its_pods_keys(module: Module, tmp_path: Path) -> None:
    # What the pod would see: the shared customer file, /secrets holding only its own keys.
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    for key in mounted_keys(pod_of(module)):
        if key.endswith(".pem"):
            (secrets_dir / key).write_bytes(testing.rsa_pem())
        else:
            value = base64.b64encode(os.urandom(32)).decode()
            (secrets_dir / key).write_text("whsec_" + value if key.startswith("webhook") else value)
    customer = tmp_path / "inboxbooster-mailer-customer.yaml"
    customer.write_text(EXAMPLE_TEXT.replace("/secrets/", f"{secrets_dir}/"))
    config = load_config(ROOT / "configs" / "inboxbooster-mailer-global.yaml", customer, service=module.section)
    password = config.redis_for(module.section).password
    assert password is not None and password.get_secret_value()  # its own Redis password, resolved


def test_compose_gives_each_container_the_same_keys_as_its_pod() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    # Only the standard Redis exporter reads an env file (its password; see STANDARD_EXPORTER_PASSWORD).
    assert [name for name, s in services.items() if "env_file" in s] == ["redis-exporter"]
    for module in MODULES:
        names = [module.script if module.pod == "postfix" else module.pod]
        if module.pod == "redis":
            names.append("queue-exporter")  # our sidecar's exporter, beside Redis
        for name in names:
            given = {s["source"] for s in services[name]["secrets"]}
            assert all(s["target"] == f"/secrets/{s['source']}" for s in services[name]["secrets"])
            assert given == mounted_keys(pod_of(module)) - OPTIONAL.get(module.pod, set()), name
