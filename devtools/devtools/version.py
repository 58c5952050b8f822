"""``mailer-version`` (``./mailer version``): the release version, and a bump in one command.

The version is written in every ``pyproject.toml`` (``common.version.__version__`` reads it from
the installed ``inboxbooster-common``), in the lock's entries of the workspace members, and again
wherever an image is named with its tag: ``docker-bake.hcl``, the kustomize images component,
the module pods, ``deploy/scaled``, ``docker-compose.yml`` and the README.

* ``mailer-version`` prints the version and lists every place that disagrees with it (exit 1);
* ``mailer-version --check`` only checks (tests/infra/test_version.py runs the same check);
* ``mailer-version 2.1.0`` rewrites every place and opens the release in CHANGELOG.md.
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: A release version as written in this repository (PEP 440 public versions, e.g. 2.1.0, 2.1.0rc1).
VERSION_RE = r"\d+(?:\.\d+)*(?:(?:a|b|rc)\d+)?(?:\.post\d+)?(?:\.dev\d+)?"
_IMAGE_TAG = rf"image: inboxbooster/[\w-]+:({VERSION_RE})"


@dataclass(frozen=True)
class Place:
    """Files (a glob below the repository) and a pattern whose first group is a version."""

    glob: str
    pattern: str

    def files(self, root: Path) -> list[Path]:
        """The files this place names (sorted)."""
        return sorted(root.glob(self.glob))


def _members(root: Path) -> list[str]:
    """Project names of the workspace root and its members."""
    root_project = tomllib.loads((root / "pyproject.toml").read_text())
    names = [root_project["project"]["name"]]
    for member in root_project["tool"]["uv"]["workspace"]["members"]:
        names.append(tomllib.loads((root / member / "pyproject.toml").read_text())["project"]["name"])
    return names


def places(root: Path = REPO) -> list[Place]:
    """Every place the version is written."""
    lock_names = "|".join(re.escape(n) for n in _members(root))
    return [
        Place("pyproject.toml", rf'(?m)^version = "({VERSION_RE})"'),
        Place("*/pyproject.toml", rf'(?m)^version = "({VERSION_RE})"'),
        Place("uv.lock", rf'\[\[package\]\]\nname = "(?:{lock_names})"\nversion = "({VERSION_RE})"'),
        Place("docker-bake.hcl", rf'variable "VERSION" \{{\s*default = "({VERSION_RE})"'),
        Place("deploy/components/images/kustomization.yaml", rf"newTag: ({VERSION_RE})"),
        Place("*/pod.yaml", _IMAGE_TAG),
        Place("deploy/scaled/workloads.yaml", _IMAGE_TAG),
        Place("docker-compose.yml", _IMAGE_TAG),
        Place("README.md", rf"inboxbooster/<module>:({VERSION_RE})"),
    ]


@dataclass(frozen=True)
class Found:
    """One written version."""

    path: Path
    line: int
    version: str


def find(root: Path = REPO) -> Iterator[Found]:
    """Every written version, in the order of :func:`places`."""
    for place in places(root):
        for path in place.files(root):
            text = path.read_text(encoding="utf-8")
            for match in re.finditer(place.pattern, text):
                yield Found(path, text.count("\n", 0, match.start(1)) + 1, match.group(1))


def current(root: Path = REPO) -> str:
    """The version of the workspace library (``inboxbooster-common``), which the others follow."""
    project = tomllib.loads((root / "common" / "pyproject.toml").read_text())["project"]
    version: str = project["version"]
    return version


def disagreements(root: Path = REPO) -> list[Found]:
    """Written versions other than :func:`current`."""
    expected = current(root)
    return [f for f in find(root) if f.version != expected]


def bump(new: str, root: Path = REPO, today: datetime.date | None = None) -> int:
    """Write ``new`` in every place; returns how many were rewritten."""
    if not re.fullmatch(VERSION_RE, new):
        raise ValueError(f"not a version: {new!r} (expected e.g. 2.1.0)")
    count = 0
    for place in places(root):
        for path in place.files(root):
            text = path.read_text(encoding="utf-8")

            def replace(match: re.Match[str]) -> str:
                nonlocal count
                count += 1
                start, end = match.span(1)
                whole = match.group(0)
                return whole[: start - match.start()] + new + whole[end - match.start() :]

            path.write_text(re.sub(place.pattern, replace, text), encoding="utf-8")
    changelog = root / "CHANGELOG.md"
    if changelog.exists():
        day = (today or datetime.date.today()).isoformat()
        text = changelog.read_text(encoding="utf-8")
        if f"## [{new}]" not in text:
            changelog.write_text(text.replace("## [Unreleased]", f"## [Unreleased]\n\n## [{new}] - {day}", 1))
    return count


def main(argv: list[str] | None = None) -> int:
    """``mailer-version [--check] [NEW]``."""
    parser = argparse.ArgumentParser(
        prog="mailer-version",
        description="Print the release version, check that every place agrees, or set a new one everywhere.",
    )
    parser.add_argument("new", nargs="?", help="the new version, e.g. 2.1.0 (rewrites every place)")
    parser.add_argument("--check", action="store_true", help="only check that every place agrees")
    args = parser.parse_args(argv)
    if args.new:
        try:
            count = bump(args.new)
        except ValueError as exc:
            parser.error(str(exc))
        sys.stdout.write(f"{args.new}: {count} places rewritten; CHANGELOG.md has a section for it\n")
        return 0
    version, wrong = current(), disagreements()
    if not args.check:
        sys.stdout.write(version + "\n")
    for found in wrong:
        sys.stderr.write(f"{found.path.relative_to(REPO)}:{found.line}: {found.version} (expected {version})\n")
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
