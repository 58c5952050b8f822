"""The PostfixLog pod's privileges are enough for Postfix, and not more than it needs.

The pod runs as root (Postfix' master insists) with every capability dropped but a few, with
``allowPrivilegeEscalation: false`` and a read-only root filesystem.  This test recreates that
on this machine -- a private mount namespace with ``/`` read-only and a writable ``/tmp``
(``unshare``), exactly the pod's capability bounding set and ``no_new_privs`` (``setpriv``) --
starts a real Postfix there and relays one mail through it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.infra.repo import BY_POD, pod_of, tool

pytestmark = [pytest.mark.postfix, pytest.mark.slow]
PROBE = Path(__file__).with_name("postfix_probe.py")
#: In the new mount namespace: /tmp becomes a fresh tmpfs (the pod's emptyDir), / read-only.
SANDBOX = (
    "mount --make-rprivate / && mount -t tmpfs -o mode=1777 tmpfs /tmp && mkdir -m 755 /tmp/pod "
    '&& mount -o remount,bind,ro / && exec "$@"'
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


def _run_with(capabilities: list[str]) -> subprocess.CompletedProcess[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root, as Postfix' master does")
    unshare = tool("unshare", package="Debian: util-linux")
    setpriv = tool("setpriv", package="Debian: util-linux")
    bounding = "-all," + ",".join(f"+{c.lower()}" for c in capabilities)
    privileges = [setpriv, "--bounding-set", bounding, "--inh-caps", "-all", "--no-new-privs"]
    return subprocess.run(
        [unshare, "--mount", "sh", "-c", SANDBOX, "sh", *privileges, sys.executable, str(PROBE), "/tmp/pod/postfix"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_postfix_runs_with_the_pods_privileges_on_a_read_only_root() -> None:
    result = _run_with(_capabilities())
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "delivered"


def test_without_chown_postfix_cannot_set_up_its_queue() -> None:
    # The check above can fail: one capability fewer and Postfix refuses to start.
    fewer = [c for c in _capabilities() if c != "CHOWN"]
    result = _run_with(fewer)
    assert result.returncode != 0
    assert "Operation not permitted" in result.stderr
