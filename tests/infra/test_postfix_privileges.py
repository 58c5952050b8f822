"""The PostfixLog pod's privileges are enough for Postfix, and not more than it needs.

The pod runs as root (Postfix' master insists) with every capability dropped but a few, with
``allowPrivilegeEscalation: false`` and a read-only root filesystem.  This test recreates that
on this machine -- a private mount namespace with ``/`` read-only and one writable tmpfs, the
pod's emptyDir (``unshare``), exactly the pod's capability bounding set and ``no_new_privs`` (``setpriv``) --
starts a real Postfix there and relays one mail through it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.infra.repo import BY_POD, pod_of, tool

pytestmark = [pytest.mark.postfix, pytest.mark.slow]
PROBE = Path(__file__).with_name("postfix_probe.py")
#: In the new mount namespace: $POD_DIR becomes a fresh tmpfs (the pod's emptyDir), / read-only.
#: (Not /tmp: the checkout, and so the Python running the probe, may live there.)
SANDBOX = (
    'mount --make-rprivate / && mount -t tmpfs -o mode=755 tmpfs "$POD_DIR" && mount -o remount,bind,ro / && exec "$@"'
)


def _container() -> dict[str, object]:
    (container,) = pod_of(BY_POD["postfix"])["spec"]["containers"]
    return container  # type: ignore[no-any-return]


def _capabilities() -> list[str]:
    security = _container()["securityContext"]
    assert isinstance(security, dict)
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    added: list[str] = security["capabilities"]["add"]
    return added


def _run_with(capabilities: list[str], pod_dir: Path) -> subprocess.CompletedProcess[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root, as Postfix' master does")
    unshare = tool("unshare", package="Debian: util-linux")
    setpriv = tool("setpriv", package="Debian: util-linux")
    bounding = "-all," + ",".join(f"+{c.lower()}" for c in capabilities)
    privileges = [setpriv, "--bounding-set", bounding, "--inh-caps", "-all", "--no-new-privs"]
    return subprocess.run(
        [unshare, "--mount", "sh", "-c", SANDBOX, "sh", *privileges, sys.executable, str(PROBE), f"{pod_dir}/postfix"],
        env={**os.environ, "POD_DIR": str(pod_dir)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def pod_dir() -> Iterator[Path]:
    """An empty directory outside /tmp for the tmpfs (Postfix' user must reach it)."""
    directory = Path(tempfile.mkdtemp(prefix="pod-", dir="/var/tmp"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_postfix_runs_with_the_pods_privileges_on_a_read_only_root(pod_dir: Path) -> None:
    result = _run_with(_capabilities(), pod_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "delivered"


def test_without_chown_postfix_cannot_set_up_its_queue(pod_dir: Path) -> None:
    # The check above can fail: one capability fewer and Postfix refuses to start.
    fewer = [c for c in _capabilities() if c != "CHOWN"]
    result = _run_with(fewer, pod_dir)
    assert result.returncode != 0
    assert "Operation not permitted" in result.stderr
