"""Ports, names and grace periods agree everywhere they are written down.

For each module: the configuration's defaults and example, the Dockerfile's EXPOSE, the pod's
container ports, the Service's ports, the ServiceMonitor's port, docker-compose.yml and the
README's deployment and termination tables.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.config.customer import CustomerConfig
from tests.infra.repo import (
    BY_POD,
    MODULES,
    REDIS_EXPORTER_IMAGE,
    ROOT,
    Module,
    bake_modules,
    bake_variable,
    load_yaml,
    pod_of,
)
from tests.infra.test_images import parse_dockerfile

EXAMPLE = CustomerConfig.model_validate(
    yaml.safe_load((ROOT / "configs" / "inboxbooster-mailer-customer.yaml").read_text())
)
#: Ports reachable from outside the cluster (load balancer or reverse proxy).
PUBLIC = {"mxserver": {25}, "receiver": {587}, "httpreceiver": {8080}}
#: Ports of third-party containers in our pods (not in our configuration or our images).
SIDECAR_PORTS = {"redis": {"redis-metrics": 9121}}  # the standard Redis exporter


def config_ports(module: Module, cfg: CustomerConfig = EXAMPLE) -> dict[str, int]:
    """Port name -> number, as the customer file configures the module."""
    section: Any = getattr(cfg, module.section)
    assert section is not None, module.section
    ports = {"metrics": section.prometheus.inet_port} if module.section != "httpreceiver" else {}
    match module.section:
        case "redis":
            ports["redis"] = section.bind.inet_port
        case "mxserver":
            ports["smtp"] = section.bind.inet_port
        case "receiver":
            ports["submission"] = section.bind.inet_port
        case "httpreceiver":
            ports |= {"http": section.bind.inet_port, "metrics": section.bind.inet_port_metrics}
    return ports


def container_ports(pod: dict[str, Any]) -> dict[str, int]:
    """Port name -> number over all containers of a pod."""
    return {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c["ports"]}


def test_example_config_uses_the_model_defaults() -> None:
    # The example file, the models' defaults and the manifests must tell one story.
    defaults = CustomerConfig.model_validate(
        {
            "redis": {},
            "backdata": {"post-url": "https://x.example"},
            "postfixlog": {},
            "transformer": {
                "domain-settings": [
                    {"domain": "a.example", "dkim-private-key-file": "k.pem", "return-path-domain": "b.a.example"}
                ]
            },
            "httpreceiver": {},
        }
    )
    for module in MODULES:
        if module.section in ("receiver", "mxserver"):
            continue  # their bind is required (no default); the example's is the contract
        assert config_ports(module, defaults) == config_ports(module), module.folder


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.folder)
def test_ports_agree(module: Module) -> None:
    ours = config_ports(module)
    sidecars = SIDECAR_PORTS.get(module.pod, {})
    expected = ours | sidecars
    pod = pod_of(module)
    assert container_ports(pod) == expected
    exposed = {
        int(p) for s in parse_dockerfile(module.path / "Dockerfile") if s.keyword == "EXPOSE" for p in s.args.split()
    }
    assert exposed == set(ours.values())
    (service,) = load_yaml(module.path / "service.yaml")
    assert service["metadata"]["name"] == module.pod
    assert service["spec"]["selector"] == {"app": module.pod} == {"app": pod["metadata"]["labels"]["app"]}
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == expected
    assert all(p["targetPort"] == p["name"] for p in service["spec"]["ports"])
    (monitor,) = load_yaml(module.path / "serviceMonitor.yml")
    endpoints = monitor["spec"]["endpoints"]
    assert [e["port"] for e in endpoints] == ["metrics", *(n for n in sidecars if n.endswith("metrics"))]
    assert expected["metrics"] == 9090
    assert all(e["path"] == "/metrics" for e in endpoints)


def _services() -> list[dict[str, Any]]:
    return [s for m in MODULES for f in sorted(m.path.glob("service*.yaml")) for s in load_yaml(f)]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.folder)
def test_each_service_monitor_selects_exactly_its_service(module: Module) -> None:
    (monitor,) = load_yaml(module.path / "serviceMonitor.yml")
    wanted = monitor["spec"]["selector"]["matchLabels"]
    selected = [
        s["metadata"]["name"]
        for s in _services()
        if all(s["metadata"]["labels"].get(k) == v for k, v in wanted.items())
    ]
    assert selected == [module.pod]


def test_load_balancers_publish_only_the_public_ports() -> None:
    found: dict[str, set[int]] = {}
    for service in _services():
        if service["spec"]["type"] == "LoadBalancer":
            pod = service["spec"]["selector"]["app"]
            found[pod] = {p["port"] for p in service["spec"]["ports"]}
            assert all(p["targetPort"] in container_ports(pod_of(BY_POD[pod])) for p in service["spec"]["ports"])
            assert service["spec"]["externalTrafficPolicy"] == "Local"
    # HttpReceiver is public through the operator's TLS reverse proxy, not a load balancer.
    assert found == {k: v for k, v in PUBLIC.items() if k != "httpreceiver"}


def test_postfix_is_only_on_loopback() -> None:
    section = EXAMPLE.postfixlog
    assert section is not None
    assert ipaddress.ip_address(section.postfix.hostname).is_loopback
    smtpd = section.string_replacer.master_cf.smtpd_port
    module = BY_POD["postfix"]
    assert smtpd not in container_ports(pod_of(module)).values()
    assert all(
        smtpd != p["port"] and p["port"] != 25 for p in load_yaml(module.path / "service.yaml")[0]["spec"]["ports"]
    )


# -- docker-compose.yml -------------------------------------------------------------------------

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
COMPOSE_NAME = {m.pod: ("postfixlog" if m.pod == "postfix" else m.pod) for m in MODULES}


def _seconds(text: str | int) -> int:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", str(text))
    assert match and any(match.groups()), text
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.folder)
def test_compose_runs_the_same_containers(module: Module) -> None:
    pod = pod_of(module)
    service = COMPOSE["services"][COMPOSE_NAME[module.pod]]
    main = pod["spec"]["containers"][0]
    assert service["image"] == main["image"]
    assert service.get("command") == main.get("args")
    # Images come from docker-bake.hcl (shared base); compose only runs them.
    assert "build" not in service
    (bake,) = [m for m in bake_modules() if m["folder"] == module.folder]
    assert service["image"] == f"{bake_variable('REGISTRY')}/{bake['image']}:{bake_variable('VERSION')}"
    assert _seconds(service["stop_grace_period"]) == pod["spec"]["terminationGracePeriodSeconds"]
    published = {int(str(p).rsplit(":", 1)[-1]) for p in service.get("ports", [])}
    assert published == PUBLIC.get(module.pod, set())


def test_compose_postfix_has_the_pods_privileges() -> None:
    (container,) = pod_of(BY_POD["postfix"])["spec"]["containers"]
    service = COMPOSE["services"]["postfixlog"]
    assert service["user"] == "0:0"
    assert service["cap_add"] == container["securityContext"]["capabilities"]["add"]
    assert "ports" not in service  # Postfix is never published


def test_compose_exporters_share_the_redis_network_namespace() -> None:
    # Both exporters read 127.0.0.1:6379, as in the pod.
    containers = pod_of(BY_POD["redis"])["spec"]["containers"]
    ours, standard = COMPOSE["services"]["queue-exporter"], COMPOSE["services"]["redis-exporter"]
    assert ours["network_mode"] == standard["network_mode"] == "service:redis"
    assert ours["command"] == containers[1]["args"]
    assert standard["image"] == containers[2]["image"] == REDIS_EXPORTER_IMAGE
    assert standard["environment"]["REDIS_ADDR"] == "redis://127.0.0.1:6379"
    env = {e["name"]: e for e in containers[2]["env"]}
    assert env["REDIS_ADDR"]["value"] == "redis://127.0.0.1:6379"  # loopback: the same pod
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "redis-password"


def test_compose_start_order_is_the_readme_order() -> None:
    order = [COMPOSE_NAME[m.pod] for m in MODULES]
    for earlier, later in itertools.pairwise(order):
        if later == "httpreceiver":
            earlier = "transformer"  # Receiver and HttpReceiver start together
        assert earlier in COMPOSE["services"][later]["depends_on"], later


# -- README -------------------------------------------------------------------------------------


def _readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    start, end = text.index("<!-- deployment:start"), text.index("<!-- deployment:end -->")
    return text[start:end]


def test_readme_termination_table_matches_the_grace_periods() -> None:
    section = _readme_section()
    table = section[section.index("### Termination") :]
    rows = re.findall(r"^\| (\d) \| `kubectl delete pod ([a-z ]+)` \| ([^:|]+):", table, re.MULTILINE)
    assert [r[0] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    seen = []
    for _, pods, graces in rows:
        names = pods.split()
        seconds = [int(g) for g in re.findall(r"(\d+) s", graces)]
        assert len(seconds) == len(names), pods
        for name, grace in zip(names, seconds, strict=True):
            assert pod_of(BY_POD[name])["spec"]["terminationGracePeriodSeconds"] == grace, name
        seen += names
    # The original README's termination order: receivers, Transformer, Postfix, BackData, MxServer, Redis.
    assert seen == ["receiver", "httpreceiver", "transformer", "postfix", "backdata", "mxserver", "redis"]


def test_readme_start_table_follows_the_modules_order() -> None:
    section = _readme_section()
    rows = re.findall(r"^\| (\d) \| [^|]+\| `kubectl create -f (\w+)/pod\.yaml", section, re.MULTILINE)
    assert [folder for _, folder in rows] == [m.folder for m in MODULES][:6]


def test_readme_mentions_only_existing_files() -> None:
    section = _readme_section()
    for path in set(re.findall(r"\b((?:[A-Z]\w+|deploy|Grafana)/[\w./-]+\.(?:ya?ml|json))", section)):
        assert (ROOT / path).is_file(), path
    for directory in re.findall(r"kubectl apply -k ([\w/.-]+)", section):
        assert (ROOT / directory / "kustomization.yaml").is_file(), directory


def test_every_module_readme_exists() -> None:
    missing = [m.folder for m in MODULES if not (m.path / "README.md").is_file()]
    assert missing == []


def test_pods_mount_configs_where_the_services_look() -> None:
    from common.config import DEFAULT_CUSTOMER_FILE, DEFAULT_GLOBAL_FILE

    assert DEFAULT_CUSTOMER_FILE.parent == DEFAULT_GLOBAL_FILE.parent == Path("/configs")
    for module in MODULES:
        for container in pod_of(module)["spec"]["containers"]:
            if container["image"].startswith("inboxbooster/"):  # not the standard Redis exporter
                assert any(m["mountPath"] == "/configs" for m in container["volumeMounts"])
