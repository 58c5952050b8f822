"""The Receiver's TLS certificate: the configured one, or a self-signed one made at start.

Files, in order: ``receiver.tls-cert-file``/``tls-key-file``, else ``receiver_cert.pem`` /
``receiver_key.pem`` next to the customer file (the original's names).  When neither is there
a self-signed RSA certificate is generated in memory at every start (as the original did); its
PEM files live only for the moment :meth:`ssl.SSLContext.load_cert_chain` needs them, in a
private temporary directory, because the config directory is a read-only ConfigMap in
Kubernetes.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from common.config import Config

log = logging.getLogger(__name__)

DEFAULT_CERT: Final = "receiver_cert.pem"
DEFAULT_KEY: Final = "receiver_key.pem"


class TlsProblem(Exception):
    """The configured certificate or key cannot be used."""


@dataclass(frozen=True)
class CertificateSource:
    """Where the certificate comes from: two files, or None for a generated one."""

    cert_file: Path | None
    key_file: Path | None

    @property
    def generated(self) -> bool:
        """True when a self-signed certificate is made at start."""
        return self.cert_file is None


def locate(config: Config) -> CertificateSource:
    """Find the certificate files the configuration names (or implies).

    Raises:
        TlsProblem: a file is named but missing, or only one of the pair exists.
    """
    section = config.customer.receiver
    assert section is not None  # the loader requires it for this service
    where = f"{config.customer_path}: receiver"
    if section.tls_cert_file is not None or section.tls_key_file is not None:
        if section.tls_cert_file is None or section.tls_key_file is None:
            raise TlsProblem(f"{where}: tls-cert-file and tls-key-file go together")
        cert, key = config.resolve(section.tls_cert_file), config.resolve(section.tls_key_file)
        for name, path in (("tls-cert-file", cert), ("tls-key-file", key)):
            if not path.is_file():
                raise TlsProblem(f"{where}.{name}: {path} does not exist")
        return CertificateSource(cert, key)
    cert, key = config.config_dir / DEFAULT_CERT, config.config_dir / DEFAULT_KEY
    if cert.is_file() and key.is_file():
        return CertificateSource(cert, key)
    if cert.is_file() or key.is_file():
        missing = key if cert.is_file() else cert
        raise TlsProblem(f"{where}: {missing} is missing (both {DEFAULT_CERT} and {DEFAULT_KEY} are needed)")
    return CertificateSource(None, None)


def server_context(source: CertificateSource, hostname: str) -> ssl.SSLContext:
    """A server-side context (TLS 1.2+) with the certificate of ``source``.

    Raises:
        TlsProblem: the files do not hold a matching certificate and key.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if source.cert_file is not None and source.key_file is not None:
        try:
            context.load_cert_chain(source.cert_file, source.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise TlsProblem(f"cannot load {source.cert_file} / {source.key_file}: {exc}") from None
        log.info("TLS certificate from %s", source.cert_file)
        return context
    cert_pem, key_pem = self_signed(hostname)
    with tempfile.TemporaryDirectory(prefix="receiver-tls-") as tmp:
        cert_path, key_path = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert_path.write_bytes(cert_pem)
        key_path.touch(mode=0o600)
        key_path.write_bytes(key_pem)
        context.load_cert_chain(cert_path, key_path)
    log.warning(
        "no %s/%s in %s: using a self-signed certificate for %s (clients must not verify it)",
        DEFAULT_CERT,
        DEFAULT_KEY,
        "the config directory",
        hostname,
    )
    return context


def self_signed(hostname: str, days: int = 365) -> tuple[bytes, bytes]:
    """A self-signed RSA-2048 certificate for ``hostname`` (and localhost); returns PEM cert, key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64] or "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dict.fromkeys((hostname, "localhost")) if n]
    alt_names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem
