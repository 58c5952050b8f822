"""The console script: --check-config, --hash-password, and where the TLS certificate comes from."""

from __future__ import annotations

import hashlib
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from common import passwords
from devtools import testing
from devtools.servers import RedisProcess, free_port
from receiver.tls import self_signed
from tests.receiver.conftest import TRUSTED_SOURCE, USER, message, receiver_config, start_receiver

# Each test starts real processes (the service, a Redis of its own): slow, not in ./mailer test --fast.
pytestmark = [pytest.mark.redis, pytest.mark.slow]


def _check(directory: Path, customer: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    gpath, cpath = testing.write_configs(directory, customer)
    return subprocess.run(
        testing.service_command("receiver", gpath, cpath, "--check-config"),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_config_accepts_a_valid_file(tmp_path: Path, redis_server: RedisProcess) -> None:
    result = _check(tmp_path, receiver_config(tmp_path, redis_server.port))
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"receiver": {"bind": {"inet-port": "smtp"}}}, "receiver.bind.inet-port"),
        ({"receiver": {"trusted-networks": ["10.0.0.0/33"]}}, "receiver.trusted-networks[0]"),
        ({"receiver": {"unknown-key": 1}}, "receiver.unknown-key: unknown key"),
        ({"receiver": {"shutdown-grace-seconds": 0}}, "receiver.shutdown-grace-seconds"),
        (
            {"receiver": {"auth-logins": [{"username": USER, "password": "pbkdf2_sha256$1000$salt$not-base64!"}]}},
            "receiver.auth-logins[0].password: malformed hash: the hash is not base64",
        ),
        ({"receiver": {"tls-cert-file": "missing.pem", "tls-key-file": "missing-key.pem"}}, "does not exist"),
        ({"receiver": {"tls-cert-file": "only-cert.pem"}}, "tls-cert-file and tls-key-file go together"),
        ({"transformer": None}, "transformer: section is missing"),
    ],
    ids=["port-type", "cidr", "unknown-key", "grace", "hash", "cert-missing", "cert-alone", "no-transformer"],
)
def test_check_config_rejects_with_exit_2(
    tmp_path: Path, redis_server: RedisProcess, override: dict[str, Any], expected: str
) -> None:
    result = _check(tmp_path, receiver_config(tmp_path, redis_server.port, override))
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr
    assert "inboxbooster-mailer-customer.yaml" in result.stderr


def test_key_without_cert_in_config_dir_is_refused(tmp_path: Path, redis_server: RedisProcess) -> None:
    _, key = self_signed("receiver.test")
    (tmp_path / "receiver_key.pem").write_bytes(key)
    result = _check(tmp_path, receiver_config(tmp_path, redis_server.port))
    assert result.returncode == 2
    assert "receiver_cert.pem is missing" in result.stderr


def test_hash_password_prints_a_hash_that_verifies() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "receiver", "--hash-password"],
        input="pässword\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    stored = result.stdout.strip()
    assert stored.startswith("pbkdf2_sha256$600000$")
    assert passwords.verify(stored, "pässword")
    assert not passwords.verify(stored, "password")


def test_certificate_from_the_config_directory_is_used(tmp_path: Path, redis_server: RedisProcess) -> None:
    # receiver_cert.pem / receiver_key.pem next to the customer file (the original's names):
    # the client verifies the server against exactly that certificate.
    cert, key = self_signed("receiver.test")
    directory = tmp_path / "configs"
    directory.mkdir()
    (directory / "receiver_cert.pem").write_bytes(cert)
    (directory / "receiver_key.pem").write_bytes(key)
    receiver = start_receiver(directory, redis_server.port)
    try:
        context = ssl.create_default_context(cafile=str(directory / "receiver_cert.pem"))
        context.check_hostname = False
        with receiver.smtp() as client:
            client.ehlo()
            client.starttls(context=context)
            assert isinstance(client.sock, ssl.SSLSocket)
            der = client.sock.getpeercert(binary_form=True)
        expected = ssl.PEM_cert_to_DER_cert(cert.decode())
        assert der is not None and hashlib.sha256(der).digest() == hashlib.sha256(expected).digest()
        assert "self-signed" not in receiver.log()
    finally:
        assert receiver.stop() == 0


def test_generated_certificate_when_none_is_configured(tmp_path: Path, redis_server: RedisProcess) -> None:
    # No files: a self-signed certificate for the configured host name, made at start; the
    # config directory stays untouched (read-only in Kubernetes).
    directory = tmp_path / "configs"
    receiver = start_receiver(directory, redis_server.port)
    try:
        with receiver.smtp() as client:
            client.ehlo()
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            client.starttls(context=context)
            assert isinstance(client.sock, ssl.SSLSocket)
            der = client.sock.getpeercert(binary_form=True)
        assert der is not None
        name = x509.load_der_x509_certificate(der).subject.rfc4514_string()
        assert name == "CN=receiver.test"
        pem_files = {p.name for p in directory.glob("*.pem")}
        assert pem_files == {f"dkim-{testing.SENDER_DOMAIN}.pem"}
        assert "self-signed" in receiver.log()
    finally:
        assert receiver.stop() == 0


def test_startup_problem_exits_2_without_serving(tmp_path: Path, redis_server: RedisProcess) -> None:
    port = free_port()
    receiver = start_receiver(
        tmp_path, redis_server.port, {"receiver": {"bind": {"inet-port": port}, "tls-key-file": "k.pem"}}, wait=False
    )
    assert receiver.wait(60) == 2
    assert "tls-cert-file and tls-key-file go together" in receiver.log()


def test_port_in_use_exits_1_with_a_clear_line(tmp_path: Path, redis_server: RedisProcess) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        receiver = start_receiver(tmp_path, redis_server.port, {"receiver": {"bind": {"inet-port": port}}}, wait=False)
        assert receiver.wait(60) == 1
    assert "cannot listen on 127.0.0.1: [Errno 98] Address already in use" in receiver.log()


def test_multiproc_dir_from_the_environment_is_cleaned_and_used(tmp_path: Path, redis_server: RedisProcess) -> None:
    # The image sets PROMETHEUS_MULTIPROC_DIR; files of an earlier run are removed at start.
    directory = tmp_path / "prom"
    directory.mkdir()
    (directory / "counter_1.db").write_bytes(b"stale")
    env = {"PROMETHEUS_MULTIPROC_DIR": str(directory)}
    receiver = start_receiver(tmp_path / "run", redis_server.port, {"receiver": {"processes": 2}}, env=env)
    try:
        with receiver.smtp(source=TRUSTED_SOURCE) as client:
            client.ehlo()
            client.sendmail(f"app@{testing.SENDER_DOMAIN}", ["someone@dest.test"], message(uuid="prom1"))
        assert receiver.metric("nbr_emails_enqueued_total") == 1
        assert not (directory / "counter_1.db").exists()
        assert list(directory.glob("counter_*.db"))
    finally:
        assert receiver.stop() == 0
