"""Several delivery instances (``postfixlog`` processes, each with its private Postfix) on one Redis.

What a StatefulSet of Postfix + PostfixLog pods is in Kubernetes, on one machine: instance
``i`` has its own directory (its Postfix queue and log: the pod's volume), its own smtpd and
metrics ports, ``myhostname`` ``mta-<i>.test`` (the ``Received:`` header names the Postfix that
delivered a message) and the stable name ``postfixlog-inst-<i>`` (a pod's name).  Used by the
scaling tests and ``bench/pipeline --scaling``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from devtools import testing
from devtools.servers import free_port, wait_until


class DeliveryInstance:
    """One ``postfixlog`` process with its own instance directory, ports and name."""

    def __init__(
        self,
        directory: Path,
        index: int,
        *,
        redis_port: int,
        nexthop: str,
        customer_override: Mapping[str, Any] | None = None,
        global_override: Mapping[str, Any] | None = None,
    ) -> None:
        self.index = index
        self.directory = directory / f"i{index}"
        self.name = f"postfixlog-inst-{index}"
        self.myhostname = f"mta-{index}.test"
        self.smtpd_port, self.metrics_port = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o755)
        customer = testing.customer_config(self.directory, redis_port=redis_port)
        customer = testing.merge(
            customer,
            {
                "postfixlog": {
                    "postfix": {"port": self.smtpd_port},
                    "string-replacer": {
                        "main-cf": {"myhostname": self.myhostname},
                        "master-cf": {"smtpd-port": self.smtpd_port},
                    },
                    "sandbox": {"enabled": True, "nexthop": nexthop},
                    "instance-directory": str(self.directory / "pf"),
                    "prometheus": {"inet-interface": "127.0.0.1", "inet-port": self.metrics_port},
                }
            },
        )
        customer = testing.merge(customer, customer_override or {})
        global_ = testing.merge(testing.global_config(), global_override or {})
        self.global_path, self.customer_path = testing.write_configs(self.directory / "configs", customer, global_)

    @property
    def consumer(self) -> str:
        """The consumer name in the ``postfixlog`` group (``<name>-0``)."""
        return f"{self.name}-0"

    @property
    def log_path(self) -> Path:
        """PostfixLog's own log (JSON lines, appended across restarts)."""
        return self.directory / "postfixlog.log"

    def start(self, timeout_s: float = 60.0) -> DeliveryInstance:
        """Start the process and wait until it is ready."""
        env = {**os.environ, "INBOXBOOSTER_CONSUMER_NAME": self.name, "INBOXBOOSTER_LOG_FORMAT": "json"}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                testing.service_command("postfixlog", self.global_path, self.customer_path),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        wait_until(self._ready, timeout_s, interval_s=0.1, what=f"{self.name} ready")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=1) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def kill(self) -> None:
        """SIGKILL (a crash or node loss: nothing is cleaned up; Postfix follows its parent)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def stop(self, timeout_s: float = 120.0) -> int | None:
        """SIGTERM (scale-down: drain into Redis) and wait; the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        return self.proc.returncode

    def queued(self) -> int:
        """Messages in its Postfix' queue (queue files in incoming, active and deferred)."""
        total = 0
        for name in ("incoming", "active", "deferred"):
            for _root, _dirs, files in os.walk(self.directory / "pf" / "queue" / name):
                total += len(files)
        return total

    def metrics_text(self) -> str:
        """The /metrics page."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
            text: str = reply.read().decode()
        return text

    def log_records(self) -> list[dict[str, Any]]:
        """PostfixLog's log lines (JSON objects), every run of this instance."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    out.append(record)
        return out

    def tail(self, lines: int = 20) -> str:
        """The last lines of the process' log."""
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
