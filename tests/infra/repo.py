"""What the infrastructure tests read: the repository's manifests, Dockerfiles and tools."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Module:
    """One deployable module: its folder, pod/Service name, console script and config section."""

    folder: str
    pod: str
    script: str
    section: str
    package: str

    @property
    def path(self) -> Path:
        """The module's folder."""
        return ROOT / self.folder


#: In the README's start order.
MODULES = (
    Module("Redis", "redis", "redis-sidecar", "redis", "redis-sidecar"),
    Module("BackData", "backdata", "backdata", "backdata", "backdata"),
    Module("MxServer", "mxserver", "mxserver", "mxserver", "mxserver"),
    Module("PostfixLog", "postfix", "postfixlog", "postfixlog", "postfixlog"),
    Module("Transformer", "transformer", "transformer", "transformer", "transformer"),
    Module("Receiver", "receiver", "receiver", "receiver", "receiver"),
    Module("HttpReceiver", "httpreceiver", "httpreceiver", "httpreceiver", "httpreceiver"),
)
BY_POD = {m.pod: m for m in MODULES}
#: The standard Redis exporter beside Redis (pod, deploy/scaled, compose): one pinned version.
REDIS_EXPORTER_IMAGE = "oliver006/redis_exporter:v1.67.0"

#: Kustomize directories and the kinds each must produce (kind -> count).
VARIANTS = {
    ".": {"Pod": 7, "Service": 9, "ServiceMonitor": 7, "PrometheusRule": 1, "NetworkPolicy": 14},
    "deploy/without-monitoring": {"Pod": 7, "Service": 9, "NetworkPolicy": 14},
    "deploy/scaled": {
        "Deployment": 5,
        "StatefulSet": 2,
        "Service": 9,
        "ServiceMonitor": 7,
        "PrometheusRule": 1,
        "NetworkPolicy": 14,
    },
    # deploy/scaled + three data nodes and three sentinels (tests/infra/test_ha_manifests.py).
    "deploy/ha": {
        "Deployment": 5,
        "StatefulSet": 3,
        "Service": 11,
        "ServiceMonitor": 7,
        "PrometheusRule": 1,
        "NetworkPolicy": 18,
        "PodDisruptionBudget": 2,
    },
    # deploy/ha + KEDA and HPAs (tests/infra/test_autoscaling.py).
    "deploy/autoscaled": {
        "Deployment": 5,
        "StatefulSet": 3,
        "Service": 11,
        "ServiceMonitor": 7,
        "PrometheusRule": 1,
        "NetworkPolicy": 19,
        "PodDisruptionBudget": 2,
        "HorizontalPodAutoscaler": 2,
        "ScaledObject": 3,
        "TriggerAuthentication": 1,
    },
}


def load_yaml(path: Path) -> list[dict[str, Any]]:
    """Every document of a YAML file (empty documents dropped)."""
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def manifest_files() -> list[Path]:
    """Every Kubernetes manifest in the repository (kustomization files excluded)."""
    files: list[Path] = []
    for module in MODULES:
        files += sorted(module.path.glob("pod.yaml"))
        files += sorted(module.path.glob("service*.yaml"))
        files += sorted(module.path.glob("serviceMonitor.yml"))
    files += sorted(p for p in (ROOT / "deploy").rglob("*.yaml") if p.name != "kustomization.yaml")
    files.append(ROOT / "Grafana" / "prometheusRule.yaml")
    return files


def tool(name: str, *, package: str) -> str:
    """Path of a command-line tool; skipped locally when absent, a failure in CI."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        message = f"{name} is not installed ({package})"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must have it")
        pytest.skip(message)
    return found


def kustomize(directory: str) -> list[dict[str, Any]]:
    """``kubectl kustomize <directory>``'s resources."""
    kubectl = tool("kubectl", package="kubectl with kustomize; see tests/infra/README.md")
    result = subprocess.run(
        [kubectl, "kustomize", str(ROOT / directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    """Resources of one kind, by name."""
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_of(module: Module) -> dict[str, Any]:
    """The module's pod.yaml."""
    (pod,) = load_yaml(module.path / "pod.yaml")
    return pod


# -- the image build (docker-bake.hcl) ----------------------------------------------------------

BAKE = ROOT / "docker-bake.hcl"
BASE_DOCKERFILE = ROOT / "Dockerfile.base"


def bake_variable(name: str) -> str:
    """The default of a string variable of docker-bake.hcl."""
    match = re.search(rf'variable "{name}" {{\s*default = "([^"]*)"\s*}}', BAKE.read_text())
    assert match, f"docker-bake.hcl has no string variable {name}"
    return match.group(1)


def bake_modules() -> list[dict[str, str]]:
    """The MODULES list of docker-bake.hcl: folder, image and workspace package of each image."""
    block = re.search(r'variable "MODULES" \{\s*default = \[(.*?)\]\s*\}', BAKE.read_text(), re.S)
    assert block, "docker-bake.hcl has no MODULES list"
    return [dict(re.findall(r'(\w+) = "([^"]*)"', item)) for item in re.findall(r"\{([^{}]*)\}", block.group(1))]
