"""One version: every pyproject.toml, the lock, the image tags and the README agree with it.

``common.version.__version__`` (what ``--version`` prints) comes from the installed
``inboxbooster-common``; ``./mailer version X.Y.Z`` (``devtools.version``) rewrites every place.
"""

from __future__ import annotations

import datetime
import shutil
from collections import Counter
from pathlib import Path

import pytest

from common.version import __version__
from devtools import version
from tests.infra.repo import MODULES, ROOT


def test_the_installed_version_is_the_written_one() -> None:
    assert __version__ == version.current()


def test_every_place_agrees() -> None:
    wrong = [f"{f.path.relative_to(ROOT)}:{f.line}: {f.version}" for f in version.disagreements()]
    assert wrong == []


def test_every_place_is_found() -> None:
    # The patterns must not rot: each place still holds the version as often as it names images.
    found = Counter(f.path.relative_to(ROOT).as_posix() for f in version.find())
    assert found["pyproject.toml"] == 1
    assert all(found[f"{m.folder}/pyproject.toml"] == 1 for m in MODULES)
    assert found["common/pyproject.toml"] == found["devtools/pyproject.toml"] == 1
    assert found["uv.lock"] == 2 + len(MODULES) + 1  # root, common, the seven, devtools
    assert found["docker-bake.hcl"] == 1
    assert found["deploy/components/images/kustomization.yaml"] == len(MODULES) + 1  # and its example comment
    assert sum(found[f"{m.folder}/pod.yaml"] for m in MODULES) == len(MODULES) + 1  # Redis: two containers
    assert found["deploy/scaled/workloads.yaml"] == len(MODULES) + 1
    assert found["docker-compose.yml"] == len(MODULES) + 1
    assert found["README.md"] >= 1


def test_the_changelog_has_the_release() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in text
    assert f"## [{version.current()}]" in text


def _copy(target: Path) -> Path:
    """The files that hold the version (and the changelog), copied below ``target``."""
    for place in version.places(ROOT):
        for path in place.files(ROOT):
            dest = target / path.relative_to(ROOT)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, dest)
    shutil.copy(ROOT / "CHANGELOG.md", target / "CHANGELOG.md")
    return target


def test_a_forgotten_place_is_found(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    pod = root / "Transformer" / "pod.yaml"
    pod.write_text(pod.read_text().replace(f"transformer:{version.current()}", "transformer:1.9.9"))
    (wrong,) = version.disagreements(root)
    assert (wrong.path, wrong.version) == (pod, "1.9.9")


def test_bump_rewrites_every_place(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    before = len(list(version.find(root)))
    assert version.bump("2.1.0", root, today=datetime.date(2027, 1, 2)) == before
    assert {f.version for f in version.find(root)} == {"2.1.0"}
    assert version.current(root) == "2.1.0" and version.disagreements(root) == []
    changelog = (root / "CHANGELOG.md").read_text()
    assert (
        changelog.index("## [Unreleased]")
        < changelog.index("## [2.1.0] - 2027-01-02")
        < changelog.index(f"## [{version.current()}]")
    )
    # The lock's other packages keep their own versions.
    lock = (root / "uv.lock").read_text()
    assert lock.count('version = "2.1.0"') == 10 and 'name = "redis"\nversion = "8.' in lock


def test_bump_refuses_what_is_not_a_version(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a version"):
        version.bump("latest", _copy(tmp_path))


def test_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert version.main([]) == 0
    assert capsys.readouterr().out == f"{__version__}\n"
    assert version.main(["--check"]) == 0
