"""docker-compose.yml validates against the Compose Specification schema (offline, vendored)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.infra.repo import ROOT, tool


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    exe = tool("check-jsonschema", package="the dev group's check-jsonschema")
    return subprocess.run(
        [exe, "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_compose_file_matches_the_compose_specification() -> None:
    result = _check(ROOT / "docker-compose.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "docker-compose.yml"
    bad.write_text((ROOT / "docker-compose.yml").read_text().replace("stop_grace_period: 2m", "stop_grace: 2m", 1))
    result = _check(bad)
    assert result.returncode != 0
    assert "stop_grace" in result.stdout + result.stderr
