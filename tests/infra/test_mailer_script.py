"""``./mailer``: help and unknown commands, what each command installs, the test command's checks.

The install logic runs for real against stand-ins for apt-get, dpkg-query and systemctl (the
script's functions are sourced; nothing on this machine is installed or touched).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.infra.repo import ROOT

MAILER = ROOT / "mailer"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(MAILER), *args], capture_output=True, text=True, timeout=30, check=False, env=env
    )


def _function(name: str) -> str:
    """The body of one shell function of ./mailer."""
    match = re.search(rf"^{name}\(\) \{{.*?^\}}", MAILER.read_text(), re.M | re.S)
    assert match, name
    return match.group(0)


# -- help -------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [("help",), ("--help",), ()], ids=["help", "--help", "nothing"])
def test_help_prints_only_the_help(args: tuple[str, ...]) -> None:
    result = run(*args)
    assert result.returncode == 0
    assert result.stderr == ""
    assert result.stdout.startswith("Inboxbooster Mailer")
    assert "set -euo" not in result.stdout and "#" not in result.stdout


def test_an_unknown_command_is_named_and_exits_2() -> None:
    result = run("foo")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("unknown command: foo\n")
    assert "./mailer up" in result.stderr  # followed by the help


def test_the_help_names_every_command() -> None:
    commands = re.findall(r"^  ([a-z]+)\)", MAILER.read_text(), re.M)
    assert {"up", "test", "setup", "deps", "down", "status", "version"} <= set(commands)
    help_text = run("help").stdout
    assert [c for c in commands if f"./mailer {c}" not in help_text] == []


# -- what gets installed when --------------------------------------------------------------------


def _array(name: str) -> list[str]:
    match = re.search(rf"^{name}=\(([^)]*)\)", MAILER.read_text(), re.M)
    assert match, name
    return match.group(1).split()


def test_running_needs_only_redis_and_postfix() -> None:
    assert _array("RUN_PACKAGES") == ["redis-server", "postfix", "postfix-pcre", "ca-certificates"]
    dev = _array("DEV_PACKAGES")
    for tool in ("swaks", "libmail-dkim-perl", "opendkim", "opendkim-tools", "prometheus", "wrk"):
        assert tool in dev
    assert not set(dev) & set(_array("RUN_PACKAGES"))
    # up installs the running set; test (and CI) the development set too.
    assert re.search(r"^  up\)\s+setup;", MAILER.read_text(), re.M)
    assert "setup --dev" in _function("run_tests")
    assert "./mailer setup --dev" in (ROOT / ".ci" / "run").read_text()


def test_setup_insists_on_a_current_lock() -> None:
    body = _function("setup")
    assert "uv sync --locked" in body and "--frozen" not in body


def test_the_test_command_runs_deptry_then_lint_then_pytest() -> None:
    body = _function("run_tests")
    order = [body.index(step) for step in ("deps", "ruff check", "mypy", "pytest")]
    assert order == sorted(order)


FAKES = {
    # apt-get: records what it installs and what invoke-rc.d's policy answers meanwhile.
    "apt-get": """#!/bin/sh
[ "$1" = update ] && exit 0
shift 3  # install -y -q
[ "$1" = --no-install-recommends ] && shift
if [ -x "$MAILER_POLICY_RC_D" ]; then
  "$MAILER_POLICY_RC_D" redis-server start; echo "policy $?" >>"$LOG"
else
  echo "policy none" >>"$LOG"
fi
for p in "$@"; do echo "$p" >>"$STATE"; done
""",
    "dpkg-query": """#!/bin/sh
grep -qx "$3" "$STATE" 2>/dev/null && echo "install ok installed" || exit 1
""",
    "debconf-set-selections": "#!/bin/sh\ncat >/dev/null\n",
    "systemctl": '#!/bin/sh\necho "systemctl $*" >>"$LOG"\n',
}


@pytest.fixture
def sandbox(tmp_path: Path) -> dict[str, str]:
    """Environment for sourcing ./mailer with stand-in package tools and a fake systemd."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKES.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "systemd").mkdir()
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "LOG": str(tmp_path / "log"),
        "STATE": str(tmp_path / "installed"),
        "MAILER_POLICY_RC_D": str(tmp_path / "policy-rc.d"),
        "MAILER_SYSTEMD_RUN": str(tmp_path / "systemd"),
        "MAILER_FUNCTIONS_ONLY": "1",
    }


def _apt_install(env: dict[str, str], *packages: str) -> list[str]:
    script = f'source "{MAILER}" && apt_install {" ".join(packages)}'
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    return Path(env["LOG"]).read_text().splitlines()


def test_no_daemon_starts_during_the_install_and_new_ones_are_disabled(sandbox: dict[str, str]) -> None:
    Path(sandbox["STATE"]).write_text("redis-server\n")  # already there: the user's own, left alone
    log = _apt_install(sandbox, "redis-server", "postfix", "swaks")
    assert log[0] == "policy 101"  # invoke-rc.d refuses every start while apt-get runs
    assert not Path(sandbox["MAILER_POLICY_RC_D"]).exists()  # and the policy is gone afterwards
    assert log[1:] == ["systemctl disable --now postfix.service"]


def test_on_a_host_without_systemd_nothing_is_disabled(sandbox: dict[str, str]) -> None:
    shutil.rmtree(sandbox["MAILER_SYSTEMD_RUN"])
    assert _apt_install(sandbox, "redis-server", "opendkim") == ["policy 101"]


def test_an_existing_policy_is_kept(sandbox: dict[str, str]) -> None:
    policy = Path(sandbox["MAILER_POLICY_RC_D"])
    policy.write_text("#!/bin/sh\nexit 0\n")
    policy.chmod(0o755)
    log = _apt_install(sandbox, "redis-server")
    assert log == ["policy 0", "systemctl disable --now redis-server.service"]
    assert policy.read_text() == "#!/bin/sh\nexit 0\n"


# -- deptry ------------------------------------------------------------------------------------


def test_deptry_finds_an_undeclared_import(tmp_path: Path) -> None:
    # PostfixLog imports redis; a copy whose pyproject forgets it fails the check ./mailer test runs.
    member = tmp_path / "PostfixLog"
    shutil.copytree(ROOT / "PostfixLog", member, ignore=shutil.ignore_patterns("__pycache__"))
    pyproject = member / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('    "redis>=5.0,<9",\n', ""))
    deptry = [sys.executable, "-m", "deptry", ".", "--no-ansi"]
    broken = subprocess.run(deptry, cwd=member, capture_output=True, text=True, timeout=60, check=False)
    assert broken.returncode != 0
    assert "DEP003 'redis' imported but it is a transitive dependency" in broken.stdout + broken.stderr
    intact = subprocess.run(deptry, cwd=ROOT / "PostfixLog", capture_output=True, text=True, timeout=60, check=False)
    assert intact.returncode == 0, intact.stdout + intact.stderr


# -- the fast tier -------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_fast_tier_leaves_out_the_whole_stack_and_real_postfix() -> None:
    (markers,) = re.findall(r'^FAST_MARKERS="([^"]+)"', MAILER.read_text(), re.M)
    targets = ["tests/e2e", "tests/postfixlog/test_crash.py", "tests/postfixlog/test_service.py"]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", markers, *targets],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "::" not in result.stdout, result.stdout
    assert re.search(r"no tests collected \(\d+ deselected\)", result.stdout), result.stdout
