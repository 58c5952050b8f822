"""deploy/autoscaled offline: KEDA ScaledObjects on queue lag and HPAs on CPU, against their schemas.

The KEDA resources are checked with ``check-jsonschema`` against the vendored schemas of KEDA's
CRDs (``tests/data/infra/keda``, source and licence in its README); the HPAs are autoscaling/v2
and go through ``kubernetes-validate --strict`` with every built variant
(``tests/infra/test_manifests.py``).  Then what the schemas cannot know: each trigger reads the
stream and consumer group its target really consumes, the targets exist and leave their replica
count to the autoscaler, and KEDA's Redis user may read exactly those statistics.
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from common import keys, redisacl
from common.config import load_config
from devtools import testing
from tests.infra.repo import ROOT, by_kind, kustomize, load_yaml, tool

SCHEMAS = ROOT / "tests" / "data" / "infra" / "keda"
COMPONENT = ROOT / "deploy" / "components" / "autoscaling"
#: Target -> (streams, consumer group) it consumes (the global file's default queue names).
CONSUMES = {
    ("Deployment", "transformer"): ({"IB-MAIL-QUEUE-P0", "IB-MAIL-QUEUE-P1"}, keys.GROUP_TRANSFORMER),
    ("StatefulSet", "postfix"): ({"INCOMING-TO-POSTFIX"}, keys.GROUP_POSTFIXLOG),
    ("Deployment", "backdata"): ({"EVENT_QUEUE"}, keys.GROUP_BACKDATA),
}


@pytest.fixture(scope="module")
def built() -> list[dict[str, Any]]:
    return kustomize("deploy/autoscaled")


def _check_schema(kind: str, docs: list[dict[str, Any]], directory: Path) -> subprocess.CompletedProcess[str]:
    exe = tool("check-jsonschema", package="the dev group's check-jsonschema")
    files = []
    for n, doc in enumerate(docs):
        path = directory / f"{kind}-{n}.json"
        path.write_text(json.dumps(doc))
        files.append(str(path))
    schema = SCHEMAS / f"{kind.lower()}_v1alpha1.json"
    return subprocess.run(
        [exe, "--schemafile", str(schema), *files], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize("kind", ["ScaledObject", "TriggerAuthentication"])
def test_keda_resources_match_the_crd_schema(kind: str, built: list[dict[str, Any]], tmp_path: Path) -> None:
    docs = list(by_kind(built, kind).values())
    assert docs
    assert all(d["apiVersion"] == "keda.sh/v1alpha1" for d in docs)
    result = _check_schema(kind, docs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_the_schema_check_can_fail(built: list[dict[str, Any]], tmp_path: Path) -> None:
    # A misspelled field and a mistyped one are caught (the vendored schema is strict).
    scaled = copy.deepcopy(by_kind(built, "ScaledObject")["transformer"])
    scaled["spec"]["maxReplicas"] = scaled["spec"].pop("maxReplicaCount")
    assert _check_schema("ScaledObject", [scaled], tmp_path).returncode != 0
    auth = copy.deepcopy(by_kind(built, "TriggerAuthentication")["inboxbooster-redis"])
    auth["spec"]["secretTargetRef"][0].pop("key")
    assert _check_schema("TriggerAuthentication", [auth], tmp_path).returncode != 0


def test_each_consumer_scales_on_the_lag_of_what_it_consumes(built: list[dict[str, Any]]) -> None:
    workloads = by_kind(built, "Deployment") | by_kind(built, "StatefulSet")
    auths = by_kind(built, "TriggerAuthentication")
    seen = {}
    for scaled in by_kind(built, "ScaledObject").values():
        spec = scaled["spec"]
        target = spec["scaleTargetRef"]
        workload = workloads[target["name"]]
        assert workload["kind"] == target["kind"]
        assert target["apiVersion"] == "apps/v1"
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]  # never scaled to zero
        streams, group = CONSUMES[(target["kind"], target["name"])]
        for trigger in spec["triggers"]:
            meta = trigger["metadata"]
            assert trigger["type"] == "redis-streams"
            assert meta["consumerGroup"] == group
            assert int(meta["lagCount"]) > 0 and int(meta["activationLagCount"]) >= 1
            assert meta["address"].startswith("redis.") and meta["address"].endswith(".svc.cluster.local:6379")
            assert trigger["authenticationRef"]["name"] in auths
        assert {t["metadata"]["stream"] for t in spec["triggers"]} == streams
        seen[(target["kind"], target["name"])] = True
    assert set(seen) == set(CONSUMES)
    # The Postfix + PostfixLog pods are the StatefulSet `postfix` (one consumer name per pod).
    assert workloads["postfix"]["kind"] == "StatefulSet"


def test_the_receivers_scale_on_cpu_and_no_target_pins_its_replicas(built: list[dict[str, Any]]) -> None:
    workloads = by_kind(built, "Deployment") | by_kind(built, "StatefulSet")
    hpas = by_kind(built, "HorizontalPodAutoscaler")
    assert set(hpas) == {"receiver", "httpreceiver"}
    for name, hpa in hpas.items():
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        (metric,) = hpa["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
        # Utilization is a share of the request: every container must request CPU.
        containers = workloads[name]["spec"]["template"]["spec"]["containers"]
        assert all(c["resources"]["requests"]["cpu"] for c in containers)
    autoscaled = {t["spec"]["scaleTargetRef"]["name"] for t in by_kind(built, "ScaledObject").values()} | set(hpas)
    for name in autoscaled:
        assert "replicas" not in workloads[name]["spec"], name
    # Those not autoscaled keep theirs: the data nodes, the sentinels, MxServer.
    assert {n for n, w in workloads.items() if "replicas" in w["spec"]} == {"redis", "redis-sentinel", "mxserver"}


def test_kedas_redis_user_exists_on_the_data_nodes_and_reads_only_queue_statistics(
    built: list[dict[str, Any]], tmp_path: Path
) -> None:
    # The TriggerAuthentication's keys are the Secret keys deploy/autoscaled adds; the data nodes
    # mount the password and create the user from redis.autoscaler.
    (secret,) = load_yaml(ROOT / "deploy" / "autoscaled" / "secret.example.yaml")
    (auth,) = by_kind(built, "TriggerAuthentication").values()
    refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    assert set(refs) == {"username", "password"}
    assert {r["name"] for r in refs.values()} == {"inboxbooster-secrets"}
    assert {r["key"] for r in refs.values()} == set(secret["stringData"])
    redis_pod = by_kind(built, "StatefulSet")["redis"]["spec"]["template"]["spec"]
    (volume,) = [v for v in redis_pod["volumes"] if "secret" in v]
    assert refs["password"]["key"] in {i["key"] for i in volume["secret"]["items"]}
    ha = yaml.safe_load((ROOT / "configs" / "ha" / "inboxbooster-mailer-customer.ha.yaml").read_text())
    customer = testing.merge(
        testing.customer_config(tmp_path, redis_port=6379),
        {
            "common-config": {"redis": {"sentinel": ha["common-config"]["redis"]["sentinel"] | {"password": None}}},
            "redis": {"autoscaler": {"username": secret["stringData"]["redis-username-keda"], "password": "k" * 24}},
        },
    )
    config = load_config(*testing.write_configs(tmp_path / "configs", customer), service="redis")
    (user,) = [u for u in redisacl.users(config) if u.service == "autoscaler"]
    assert user.name == "keda"
    assert user.commands - redisacl.CONNECTION == {"xinfo|groups", "xpending", "xlen"}
    streams = set().union(*(streams for streams, _ in CONSUMES.values()))
    assert set(user.patterns) == streams
    # KEDA's operator may reach the data nodes' 6379, from its own namespace only.
    (policy,) = [p for p in by_kind(built, "NetworkPolicy").values() if p["metadata"]["name"] == "redis-from-keda"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]
    assert rule["from"][0]["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "keda"}}


def test_the_component_files_say_what_they_need() -> None:
    # The namespace placeholder and the prerequisites are written where a user looks.
    text = (COMPONENT / "keda.yaml").read_text()
    assert "replace `mailer` in `address` by your namespace" in text
    assert "redis.autoscaler" in (COMPONENT / "kustomization.yaml").read_text()
