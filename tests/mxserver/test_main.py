"""The ``mxserver`` console script: config check, metrics/health endpoints, SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from devtools import testing
from devtools.servers import RedisProcess, free_port, port_open, wait_until

# Each test starts real processes (the service, a Redis of its own): slow, not in ./mailer test --fast.
pytestmark = [pytest.mark.redis, pytest.mark.slow]


def write(tmp_path: Path, redis_port: int, **mx: Any) -> tuple[Path, Path, dict[str, int]]:
    ports = {"mxserver": free_port(), "mxserver-metrics": free_port()}
    customer = testing.customer_config(tmp_path, redis_port=redis_port, ports=ports)
    customer["mxserver"].update(mx)
    global_path, customer_path = testing.write_configs(tmp_path / "configs", customer)
    return global_path, customer_path, ports


def command(global_path: Path, customer_path: Path, *extra: str) -> list[str]:
    return testing.service_command("mxserver", global_path, customer_path, *extra)


def test_check_config(tmp_path: Path, redis_server: RedisProcess) -> None:
    g, c, _ = write(tmp_path, redis_server.port)
    ok = subprocess.run(command(g, c, "--check-config"), capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "configuration OK" in ok.stdout


def test_bad_config_names_the_key(tmp_path: Path, redis_server: RedisProcess) -> None:
    g, c, _ = write(tmp_path, redis_server.port, **{"tls-cert-file": "cert.pem", "max-message-size": "big"})
    bad = subprocess.run(command(g, c, "--check-config"), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert f"{c}: mxserver.max-message-size: " in bad.stderr
    g, c, _ = write(tmp_path, redis_server.port, **{"tls-cert-file": "cert.pem"})
    bad = subprocess.run(command(g, c, "--check-config"), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert f"{c}: mxserver: tls-cert-file and tls-key-file go together" in bad.stderr


def test_runs_serves_health_and_stops_on_sigterm(tmp_path: Path, redis_server: RedisProcess) -> None:
    g, c, ports = write(tmp_path, redis_server.port)
    proc = subprocess.Popen(command(g, c), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: port_open("127.0.0.1", ports["mxserver"]), 20, what="mxserver port")
        base = f"http://127.0.0.1:{ports['mxserver-metrics']}"
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as reply:
            assert reply.status == 200
        with urllib.request.urlopen(f"{base}/readyz", timeout=5) as reply:
            assert reply.status == 200
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        for name in (
            "mxserver_received_unsubscribe_total",
            "mxserver_received_spam_total",
            "mxserver_received_autoreply_total",
            "mxserver_received_unclassified_total",
            "mxserver_warnings_total",
            "memory_usage_percent",
        ):
            assert name in text
        # A session open at SIGTERM is told 421; the process exits 0.
        sock = socket.create_connection(("127.0.0.1", ports["mxserver"]), timeout=5)
        assert sock.recv(100).startswith(b"220 ")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert sock.recv(100).startswith(b"421 4.3.2")
        sock.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=10)
    assert "listening on 127.0.0.1:" in err
    assert "stopped" in err
