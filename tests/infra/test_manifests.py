"""Kubernetes manifests, validated offline: schemas, kustomize builds, policies, pod conventions.

No cluster is needed: ``kubernetes-validate --strict`` checks the built-in kinds against the
Kubernetes OpenAPI schemas (unknown fields are errors), the Prometheus Operator kinds are checked
against pydantic models generated from its CRDs, and ``kubectl kustomize`` builds every variant.
"""

from __future__ import annotations

import copy
import functools
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from devtools import version
from tests.infra.repo import (
    BY_POD,
    MODULES,
    REDIS_EXPORTER_IMAGE,
    ROOT,
    VARIANTS,
    kustomize,
    load_yaml,
    manifest_files,
    pod_of,
    tool,
)

#: Prometheus Operator kinds: checked against models generated from its CRDs.
CRD_KINDS = ("ServiceMonitor", "PrometheusRule")
#: KEDA kinds: checked against its CRDs' schemas (tests/infra/test_autoscaling.py).
KEDA_KINDS = ("ScaledObject", "TriggerAuthentication")
#: Kinds kubernetes-validate has no schema for.
OTHER_SCHEMAS = CRD_KINDS + KEDA_KINDS


@functools.cache
def _crd_model(kind: str) -> type[Any]:
    # Imported on first use: the generated module takes seconds to import.
    from cloudcoil.models.prometheus_operator import v1

    model: type[Any] = getattr(v1, kind)
    return model


#: Oldest and newest Kubernetes versions the manifests are checked against (sysctl
#: net.ipv4.ip_unprivileged_port_start is a safe sysctl since 1.22).
KUBERNETES_VERSIONS = ("1.28.0", "1.37.0")


def _kubernetes_validate(files: list[Path], version: str) -> subprocess.CompletedProcess[str]:
    exe = tool("kubernetes-validate", package="the dev group's kubernetes-validate")
    return subprocess.run(
        [exe, "--strict", "-k", version, *map(str, files)], capture_output=True, text=True, timeout=120, check=False
    )


def _builtin_kind_files() -> list[Path]:
    return [p for p in manifest_files() if not any(d.get("kind") in OTHER_SCHEMAS for d in load_yaml(p))]


@pytest.mark.slow
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_passes_kubernetes_validate_strict(version: str) -> None:
    files = _builtin_kind_files()
    # 7 pods, 7 Services, 2 load balancers, NetworkPolicies, the Secret example, scaled workloads;
    # deploy/ha (its Redis, its NetworkPolicies, its Secret keys), deploy/autoscaled's Secret keys,
    # the autoscaling component's HPAs and NetworkPolicy.
    assert len(files) == 25
    result = _kubernetes_validate(files, version)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # A kind without a schema (a typo in apiVersion) is only a warning for the tool.
    assert "WARN" not in output, output
    assert output.count(" passed for resource ") == sum(len(load_yaml(f)) for f in files)


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_kustomize_output_passes_kubernetes_validate_strict(variant: str, tmp_path: Path) -> None:
    docs = [d for d in kustomize(variant) if d["kind"] not in OTHER_SCHEMAS]
    built = tmp_path / "built.yaml"
    built.write_text(yaml.safe_dump_all(docs))
    result = _kubernetes_validate([built], KUBERNETES_VERSIONS[-1])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARN" not in result.stdout + result.stderr


def test_strict_validation_catches_an_unknown_field(tmp_path: Path) -> None:
    # The check above can fail: a misspelled field is an error.
    pod = pod_of(MODULES[4])
    pod["spec"]["containers"][0]["readinessProbes"] = pod["spec"]["containers"][0].pop("readinessProbe")
    bad = tmp_path / "pod.yaml"
    bad.write_text(yaml.safe_dump(pod))
    result = _kubernetes_validate([bad], KUBERNETES_VERSIONS[-1])
    assert result.returncode != 0
    assert "readinessProbes" in result.stdout + result.stderr


def _crd_problems(doc: dict[str, Any]) -> list[str]:
    """Schema errors, plus fields the CRD does not know (the model would silently drop them)."""
    try:
        model = _crd_model(doc["kind"]).model_validate(doc)
    except ValidationError as exc:
        return [str(exc)]
    dumped = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
    return [] if dumped == doc else [f"unknown or altered fields: {_diff(doc, dumped)}"]


def _diff(want: Any, got: Any, path: str = "") -> str:
    if isinstance(want, dict) and isinstance(got, dict):
        for key in want:
            if key not in got:
                return f"{path}.{key}"
            found = _diff(want[key], got[key], f"{path}.{key}")
            if found:
                return found
        return ""
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        for i, (a, b) in enumerate(zip(want, got, strict=True)):
            found = _diff(a, b, f"{path}[{i}]")
            if found:
                return found
        return ""
    return "" if want == got else path or "(root)"


def _crd_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in manifest_files() for d in load_yaml(p) if d.get("kind") in CRD_KINDS]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "doc"), _crd_docs(), ids=lambda v: str(v.relative_to(ROOT)) if isinstance(v, Path) else ""
)
def test_prometheus_operator_resources_match_their_crd(path: Path, doc: dict[str, Any]) -> None:
    assert _crd_problems(doc) == []


@pytest.mark.slow
def test_crd_check_catches_unknown_and_mistyped_fields() -> None:
    (monitor,) = load_yaml(ROOT / "Redis" / "serviceMonitor.yml")
    typo = copy.deepcopy(monitor)
    typo["spec"]["endpoints"][0]["intervall"] = "30s"
    assert _crd_problems(typo) == ["unknown or altered fields: .spec.endpoints[0].intervall"]
    wrong = copy.deepcopy(monitor)
    wrong["spec"]["endpoints"][0]["port"] = 9090
    assert "Input should be a valid string" in _crd_problems(wrong)[0]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_kustomize_builds(variant: str) -> None:
    docs = kustomize(variant)
    kinds: dict[str, int] = {}
    for doc in docs:
        kinds[doc["kind"]] = kinds.get(doc["kind"], 0) + 1
    assert kinds == VARIANTS[variant]
    images = {c["image"] for d in docs for c in _pod_spec(d).get("containers", [])}
    ours = {f"inboxbooster/{m.folder.lower()}:{version.current()}" for m in MODULES}
    assert images == ours | {REDIS_EXPORTER_IMAGE}


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "Pod":
        spec: dict[str, Any] = doc["spec"]
        return spec
    if doc["kind"] in ("Deployment", "StatefulSet"):
        spec = doc["spec"]["template"]["spec"]
        return spec
    return {}


def test_scaled_workloads_run_exactly_the_pod_files() -> None:
    # deploy/scaled/workloads.yaml repeats each pod.yaml's spec; only the volume a StatefulSet
    # claims per replica differs.  This keeps the two from drifting apart.
    workloads = load_yaml(ROOT / "deploy" / "scaled" / "workloads.yaml")
    assert {w["metadata"]["name"] for w in workloads} == set(BY_POD)
    for workload in workloads:
        pod = pod_of(BY_POD[workload["metadata"]["name"]])
        template = workload["spec"]["template"]
        assert template["metadata"]["labels"] == pod["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"] == {"app": pod["metadata"]["name"]}
        expected = copy.deepcopy(pod["spec"])
        if workload["kind"] == "StatefulSet":
            claimed = {c["metadata"]["name"] for c in workload["spec"]["volumeClaimTemplates"]}
            assert claimed <= {v["name"] for v in expected["volumes"] if "emptyDir" in v}
            expected["volumes"] = [v for v in expected["volumes"] if v["name"] not in claimed]
            # Redis is one server; delivery pods (postfix) scale out, each its own instance.
            if workload["metadata"]["name"] == "redis":
                assert workload["spec"]["replicas"] == 1
            else:
                assert workload["spec"]["replicas"] >= 2
        assert template["spec"] == expected, workload["metadata"]["name"]


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In", "only In is evaluated here"
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def _ingress(policies: list[dict[str, Any]], labels: dict[str, str]) -> list[tuple[int, list[Any] | None]]:
    """(port, peers) admitted into a pod with ``labels``; peers None = from anywhere."""
    allowed = []
    for policy in policies:
        if not _selects(policy["spec"]["podSelector"], labels):
            continue
        for rule in policy["spec"].get("ingress", []):
            for port in rule["ports"]:
                allowed.append((port["port"], rule.get("from")))
    return allowed


def _egress(policies: list[dict[str, Any]], labels: dict[str, str]) -> set[tuple[int, str]]:
    """(port, destination) a pod with ``labels`` may reach: anywhere, redis, kube-dns."""
    allowed: set[tuple[int, str]] = set()
    for policy in policies:
        if not _selects(policy["spec"]["podSelector"], labels):
            continue
        for rule in policy["spec"].get("egress", []):
            for peer in rule["to"]:
                if "ipBlock" in peer:
                    assert peer["ipBlock"]["cidr"] in ("0.0.0.0/0", "::/0") and "except" not in peer["ipBlock"]
                    where = "anywhere"
                elif peer.get("podSelector") == {"matchLabels": {"app": "redis"}} and "namespaceSelector" not in peer:
                    where = "redis"
                else:
                    assert peer == {
                        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
                    }, peer
                    where = "dns"
                allowed |= {(port["port"], where) for port in rule["ports"]}
    return allowed


def test_egress_only_where_each_pod_must_go() -> None:
    # Issue 16: no egress policy let a pod taken over reach anything.  Now: DNS and Redis for all,
    # port 25 for Postfix, 443/80 for BackData's webhook, 443 for Redis' object storage.
    policies = load_yaml(ROOT / "deploy" / "base" / "network-policies.yaml")
    pods = {m.pod: pod_of(m)["metadata"]["labels"] for m in MODULES}
    for name, labels in pods.items():
        # Every pod is under the default deny for egress too.
        assert any(
            _selects(p["spec"]["podSelector"], labels)
            and p["spec"]["policyTypes"] == ["Egress"]
            and "egress" not in p["spec"]
            for p in policies
        ), name
    base = {(53, "dns"), (6379, "redis")}
    assert {name: _egress(policies, labels) for name, labels in pods.items()} == {
        "redis": {(53, "dns"), (443, "anywhere")},
        "backdata": base | {(443, "anywhere"), (80, "anywhere")},
        "mxserver": base,
        "postfix": base | {(25, "anywhere")},
        "transformer": base,
        "receiver": base,
        "httpreceiver": base,
    }


def test_network_policies_isolate_postfix_and_redis() -> None:
    policies = load_yaml(ROOT / "deploy" / "base" / "network-policies.yaml")
    pods = {m.pod: pod_of(m)["metadata"]["labels"] for m in MODULES}
    for name, labels in pods.items():
        # Every pod is under the default deny: only the listed ports get in.
        assert any(
            _selects(p["spec"]["podSelector"], labels)
            and p["spec"]["policyTypes"] == ["Ingress"]
            and "ingress" not in p["spec"]
            for p in policies
        ), name
    # Postfix relays for whoever reaches it: nothing but metrics, and never from outside.
    postfix = _ingress(policies, pods["postfix"])
    assert {port for port, _ in postfix} == {9090}
    assert all(peers == [{"namespaceSelector": {}}] for _, peers in postfix)
    # Redis: 6379 only from the mailer's own pods.
    redis_rules = [(port, peers) for port, peers in _ingress(policies, pods["redis"]) if port == 6379]
    assert len(redis_rules) == 1
    peers = redis_rules[0][1]
    assert peers is not None
    admitted = {name for name, labels in pods.items() if any(_selects(p["podSelector"], labels) for p in peers)}
    assert admitted == set(pods)
    assert not _selects(peers[0]["podSelector"], {"app": "somebody-else"})
    # The public ports are open to all, and only on their own pods.
    public = {
        name: {port for port, peers in _ingress(policies, labels) if peers is None} for name, labels in pods.items()
    }
    assert public == {
        "redis": set(),
        "backdata": set(),
        "mxserver": {25},
        "postfix": set(),
        "transformer": set(),
        "receiver": {587},
        "httpreceiver": {8080},
    }


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.folder)
def test_pod_conventions(module: Any) -> None:
    pod = pod_of(module)
    spec = pod["spec"]
    assert pod["metadata"]["name"] == module.pod
    assert pod["metadata"]["labels"]["app"] == module.pod
    assert spec["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["configs"] == {"name": "configs", "configMap": {"name": "inboxbooster-config"}}
    # Passwords and keys: readable by the service user (fsGroup) only, and the Secret is optional;
    # which keys each pod gets is tests/infra/test_secrets.py's business.
    secret = dict(volumes["secrets"]["secret"])
    assert secret.pop("items")
    assert secret == {"secretName": "inboxbooster-secrets", "optional": True, "defaultMode": 0o440}
    for container in spec["containers"]:
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        if not container["image"].startswith("inboxbooster/"):
            # A third-party sidecar (the standard Redis exporter): a pinned version, its own health
            # endpoint, no access to the configuration.
            assert re.fullmatch(r"[\w./-]+:v?\d+(\.\d+)+", container["image"]), container["image"]
            assert container["readinessProbe"]["httpGet"]["path"] == "/health"
            assert not container.get("volumeMounts")
            continue
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts["/configs"]["readOnly"] is True
        assert mounts["/secrets"]["readOnly"] is True
        assert "/tmp" in mounts
        if "metrics" in ports:
            assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
            assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        else:  # redis-server itself: its exporter's /readyz (PING) gates the pod's readiness
            assert container["readinessProbe"]["tcpSocket"] == {"port": "redis"}
    if module.folder == "PostfixLog":
        # Postfix' master must start as root; everything else is taken away.
        (container,) = spec["containers"]
        assert container["securityContext"]["runAsUser"] == 0
        # Measured: Postfix 3.7 under `setpriv --bounding-set` needs exactly these (KILL: master
        # signals its daemons, which run as the postfix user).
        assert container["securityContext"]["capabilities"]["add"] == [
            "CHOWN", "DAC_OVERRIDE", "FOWNER", "KILL", "SETGID", "SETUID",
        ]  # fmt: skip
    else:
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == 10001
    assert all(c["securityContext"]["readOnlyRootFilesystem"] for c in spec["containers"])
