"""deploy/ha offline: three data nodes and three sentinels that survive losing a machine, least privilege.

The built variant (``kubectl kustomize deploy/ha``) against the HA example configuration
(``configs/`` example plus ``configs/ha/inboxbooster-mailer-customer.ha.yaml``): node and
sentinel names resolve to the StatefulSets' pods, every pod mounts exactly the secret keys its
service reads there, disruption budgets and anti-affinity keep a quorum and a replica through a
drain, and the NetworkPolicies admit the sentinels' port from the mailer's pods only.
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
from tests.infra.repo import ROOT, by_kind, kustomize, load_yaml

EXAMPLE: dict[str, Any] = yaml.safe_load((ROOT / "configs" / "inboxbooster-mailer-customer.yaml").read_text())
HA_SNIPPET: dict[str, Any] = yaml.safe_load(
    (ROOT / "configs" / "ha" / "inboxbooster-mailer-customer.ha.yaml").read_text()
)
HA_EXAMPLE = testing.merge(EXAMPLE, HA_SNIPPET)
SECRET_REF = re.compile(r"^\$\{file:/secrets/([-._A-Za-z0-9]+)\}$")
SECRET_PATH = re.compile(r"^/secrets/([-._A-Za-z0-9]+)$")
#: Pod (app label) -> the configuration service it runs.
SERVICE_OF = {
    "redis": "redis",
    "redis-sentinel": "redis-sentinel",
    "backdata": "backdata",
    "mxserver": "mxserver",
    "postfix": "postfixlog",
    "transformer": "transformer",
    "receiver": "receiver",
    "httpreceiver": "httpreceiver",
}
#: Commented-out features of the examples whose keys a pod mounts anyway (pod -> keys).
OPTIONAL = {"redis": {"s3-access-key-id", "s3-secret-access-key"}}
MAILER_PODS = set(SERVICE_OF)


@pytest.fixture(scope="module")
def built() -> list[dict[str, Any]]:
    return kustomize("deploy/ha")


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


def needed_keys(service: str, config: dict[str, Any] = HA_EXAMPLE) -> set[str]:
    """Secret keys ``service`` reads in ``config`` (its READS, plus files its own section names)."""
    out: set[str] = set()
    section = "redis" if service == "redis-sentinel" else service
    for where, value in _walk(config):
        ref = SECRET_REF.match(value.strip())
        if ref and any(_under(where, path) for path in READS[service]):
            out.add(ref.group(1))
        path = SECRET_PATH.match(value.strip())
        if path and where[0] == section and service != "redis-sentinel":
            out.add(path.group(1))
    return out


def _pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def _mounted(workload: dict[str, Any]) -> set[str]:
    (volume,) = [v for v in _pod_spec(workload)["volumes"] if "secret" in v]
    return {item["key"] for item in volume["secret"]["items"]}


def _workloads(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return by_kind(docs, "Deployment") | by_kind(docs, "StatefulSet")


def test_every_pod_mounts_exactly_the_keys_its_service_reads_with_sentinel(built: list[dict[str, Any]]) -> None:
    # Every service now reads the sentinels' password; only the data nodes get the replication
    # and sentinel users' passwords, and the sentinels nothing but their two.
    for name, workload in _workloads(built).items():
        app = workload["spec"]["template"]["metadata"]["labels"]["app"]
        mounted, needed = _mounted(workload), needed_keys(SERVICE_OF[app])
        assert mounted - needed - OPTIONAL.get(app, set()) == set(), f"{name} gets keys it does not use"
        assert needed - mounted == set(), f"{name} lacks keys its service reads"
        if app not in ("redis", "redis-sentinel"):
            assert "redis-sentinel-password" in mounted
    sentinel = _workloads(built)["redis-sentinel"]
    assert _mounted(sentinel) == {"redis-sentinel-password", "redis-password-sentinel"}


def test_the_ha_secret_example_lists_exactly_the_keys_ha_adds(built: list[dict[str, Any]]) -> None:
    (base,) = load_yaml(ROOT / "deploy" / "secret.example.yaml")
    (ha,) = load_yaml(ROOT / "deploy" / "ha" / "secret.example.yaml")
    mounted = set().union(*(_mounted(w) for w in _workloads(built).values()))
    assert set(ha["stringData"]) == mounted - set(base["stringData"])
    assert set(ha["stringData"]).isdisjoint(base["stringData"])


@pytest.mark.parametrize("service", sorted(set(SERVICE_OF.values())))
def test_each_pod_loads_the_ha_configuration_with_only_its_keys(
    built: list[dict[str, Any]], service: str, tmp_path: Path
) -> None:
    # What the pod sees: the shared customer file (example + HA keys), /secrets with its keys only.
    (workload,) = [
        w
        for w in _workloads(built).values()
        if SERVICE_OF[w["spec"]["template"]["metadata"]["labels"]["app"]] == service
    ]
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    for key in _mounted(workload):
        if key.endswith(".pem"):
            (secrets_dir / key).write_bytes(testing.rsa_pem())
        else:
            value = base64.b64encode(os.urandom(32)).decode()
            (secrets_dir / key).write_text("whsec_" + value if key.startswith("webhook") else value)
    customer = tmp_path / "inboxbooster-mailer-customer.yaml"
    customer.write_text(yaml.safe_dump(HA_EXAMPLE).replace("/secrets/", f"{secrets_dir}/"))
    config = load_config(ROOT / "configs" / "inboxbooster-mailer-global.yaml", customer, service=service)
    server = config.redis_for("redis" if service == "redis-sentinel" else service)
    assert server.sentinel is not None
    assert server.sentinel.password is not None and server.sentinel.password.get_secret_value()
    if service not in ("redis", "redis-sentinel"):
        assert server.replica_acks == 1


def test_node_and_sentinel_names_are_the_statefulsets_pods(built: list[dict[str, Any]]) -> None:
    # redis.replication.nodes and common-config.redis.sentinel.addresses must name the pods the
    # headless Services publish: <statefulset>-<n>.<serviceName>:<port>, every one of them.
    workloads = _workloads(built)
    services = by_kind(built, "Service")
    for name, listed in (
        ("redis", HA_SNIPPET["redis"]["replication"]["nodes"]),
        ("redis-sentinel", HA_SNIPPET["common-config"]["redis"]["sentinel"]["addresses"]),
    ):
        workload = workloads[name]
        headless = services[workload["spec"]["serviceName"]]
        assert headless["spec"]["clusterIP"] == "None"
        assert headless["spec"]["publishNotReadyAddresses"] is True
        assert headless["spec"]["selector"] == workload["spec"]["selector"]["matchLabels"]
        (port,) = headless["spec"]["ports"]
        expected = [
            f"{name}-{n}.{headless['metadata']['name']}:{port['port']}" for n in range(workload["spec"]["replicas"])
        ]
        assert listed == expected
    # Three data nodes (a primary and two replicas: one may be lost and writes still confirmed)
    # and three sentinels with a quorum of two.
    assert workloads["redis"]["spec"]["replicas"] == 3
    assert workloads["redis-sentinel"]["spec"]["replicas"] == 3
    assert HA_SNIPPET["redis"]["sentinel"]["quorum"] == 2
    assert HA_SNIPPET["redis"]["replication"]["min-replicas-to-write"] == 1
    # The metrics ServiceMonitor still selects only the `redis` Service (each data node's exporter).
    assert "app.kubernetes.io/name" in services["redis"]["metadata"]["labels"]
    assert services["redis-nodes"]["metadata"]["labels"]["app.kubernetes.io/name"] != "redis"


def test_losing_a_machine_or_a_drain_keeps_a_quorum_and_a_replica(built: list[dict[str, Any]]) -> None:
    workloads = _workloads(built)
    budgets = by_kind(built, "PodDisruptionBudget")
    for name in ("redis", "redis-sentinel"):
        spec = _pod_spec(workloads[name])
        (rule,) = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert rule == {"labelSelector": {"matchLabels": {"app": name}}, "topologyKey": "kubernetes.io/hostname"}
        assert budgets[name]["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": {"app": name}}}
    # The data nodes keep their volume; the sentinels keep their state in memory, private.
    assert [c["metadata"]["name"] for c in workloads["redis"]["spec"]["volumeClaimTemplates"]] == ["data"]
    volumes = {v["name"]: v for v in _pod_spec(workloads["redis-sentinel"])["volumes"]}
    assert volumes["sentinel"]["emptyDir"]["medium"] == "Memory"
    (container,) = _pod_spec(workloads["redis-sentinel"])["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["sentinel"] == "/sentinel"  # redis.sentinel.data-directory's default
    assert container["args"] == ["sentinel"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert _pod_spec(workloads["redis-sentinel"])["automountServiceAccountToken"] is False


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    return all(labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", []))


def test_sentinels_are_reachable_from_the_mailers_pods_only(built: list[dict[str, Any]]) -> None:
    policies = list(by_kind(built, "NetworkPolicy").values())
    sentinel = {"app": "redis-sentinel", "app.kubernetes.io/part-of": "inboxbooster-mailer"}
    rules = [
        (port["port"], rule.get("from"))
        for p in policies
        if "Ingress" in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], sentinel)
        for rule in p["spec"].get("ingress", [])
        for port in rule["ports"]
    ]
    # 9090: the base's metrics rule for every mailer pod (a sentinel pod has no listener there).
    assert {port for port, _ in rules} == {26379, 9090}
    (peers,) = [peers for port, peers in rules if port == 26379]
    assert peers is not None
    admitted = {
        app for app in [*MAILER_PODS, "somebody-else"] if any(_selects(p["podSelector"], {"app": app}) for p in peers)
    }
    assert admitted == MAILER_PODS
    # The default deny still covers the sentinels, both ways.
    for kind in ("Ingress", "Egress"):
        assert any(
            _selects(p["spec"]["podSelector"], sentinel)
            and p["spec"]["policyTypes"] == [kind]
            and kind.lower() not in p["spec"]
            for p in policies
        )
    # Egress: every mailer pod may ask the sentinels; data nodes and sentinels reach the data nodes.
    for app in MAILER_PODS:
        labels = {"app": app, "app.kubernetes.io/part-of": "inboxbooster-mailer"}
        egress = {
            (port["port"], peer["podSelector"]["matchLabels"]["app"])
            for p in policies
            if "Egress" in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], labels)
            for rule in p["spec"].get("egress", [])
            for peer in rule["to"]
            if "podSelector" in peer and "namespaceSelector" not in peer
            for port in rule["ports"]
        }
        assert (26379, "redis-sentinel") in egress, app
        assert (6379, "redis") in egress, app
