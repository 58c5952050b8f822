"""Load and check DKIM private keys (used by config validation and the Transformer).

RSA keys are PEM (PKCS#1 ``BEGIN RSA PRIVATE KEY`` as the original README generates, or
PKCS#8), 1024 to 4096 bits.  Ed25519 keys are PEM PKCS#8 or, as dkimpy expects, the base64 of
the raw 32-byte seed.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

MIN_RSA_BITS = 1024
MAX_RSA_BITS = 4096

if TYPE_CHECKING:
    from common.config.transformer import TransformerSection

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class KeyProblem(ValueError):
    """A key file is missing, unreadable or not a usable DKIM key."""


def load_private_key(path: Path, kind: Literal["rsa", "ed25519"] | str) -> PrivateKey:
    """Read ``path`` and return the private key, or raise :class:`KeyProblem` saying why not."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyProblem(f"file {path} does not exist") from None
    except OSError as exc:
        raise KeyProblem(f"cannot read {path}: {exc.strerror or exc}") from None
    if kind == "ed25519":
        return _load_ed25519(data, path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyProblem(f"{path} is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise KeyProblem(f"{path} holds a {type(key).__name__}, expected an RSA key")
    if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
        raise KeyProblem(
            f"{path}: RSA key of {key.key_size} bits; use {MIN_RSA_BITS}-{MAX_RSA_BITS} (2048 recommended)"
        )
    return key


def _load_ed25519(data: bytes, path: Path) -> ed25519.Ed25519PrivateKey:
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyProblem(f"{path} is not an unencrypted PEM private key ({exc})") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise KeyProblem(f"{path} holds a {type(key).__name__}, expected an Ed25519 key")
        return key
    try:
        seed = base64.b64decode(data.strip(), validate=True)
    except binascii.Error:
        raise KeyProblem(f"{path} is neither PEM nor base64 of a 32-byte Ed25519 seed") from None
    if len(seed) != 32:
        raise KeyProblem(f"{path}: Ed25519 seed must be 32 bytes, got {len(seed)}")
    return ed25519.Ed25519PrivateKey.from_private_bytes(seed)


def public_key_record(key: PrivateKey) -> str:
    """The ``v=DKIM1`` TXT record value publishing the public half of ``key``."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


def generate_rsa_pem(bits: int = 2048) -> bytes:
    """A new RSA key as PKCS#1 PEM (the format the original README documents)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def generate_ed25519_seed() -> bytes:
    """A new Ed25519 key as base64 of the raw seed (dkimpy's format)."""
    key = ed25519.Ed25519PrivateKey.generate()
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return base64.b64encode(raw) + b"\n"


@dataclass(frozen=True)
class DomainKeys:
    """The keys of one ``transformer.domain-settings`` entry."""

    domain: str
    selector: str
    rsa: PrivateKey
    #: (selector, key) of the optional second, ed25519 signature.
    ed25519: tuple[str, PrivateKey] | None


def load_domain_keys(section: TransformerSection, customer_path: Path) -> tuple[list[DomainKeys], list[str]]:
    """Every domain's keys, and one problem line (file and key path) per key that cannot be used.

    Relative key paths are resolved from the customer file's directory.  The one place that
    loads configured keys: the configuration check, the Transformer and ``transformer-dkim``.
    """
    loaded: list[DomainKeys] = []
    problems: list[str] = []
    for i, setting in enumerate(section.domain_settings):
        where = f"{customer_path}: transformer.domain-settings[{i}]"

        def load(name: str, path: Path, kind: str) -> PrivateKey | None:
            try:
                return load_private_key(path if path.is_absolute() else customer_path.parent / path, kind)
            except KeyProblem as exc:
                problems.append(f"{where}.{name}: {exc}")  # noqa: B023 -- called at once, in this iteration
                return None

        rsa_key = load("dkim-private-key-file", setting.dkim_private_key_file, "rsa")
        ed_key: PrivateKey | None = None
        if setting.ed25519_private_key_file is not None:
            ed_key = load("ed25519-private-key-file", setting.ed25519_private_key_file, "ed25519")
        if rsa_key is None or (setting.ed25519_private_key_file is not None and ed_key is None):
            continue
        ed = (setting.ed25519_selector, ed_key) if ed_key is not None and setting.ed25519_selector else None
        loaded.append(DomainKeys(setting.domain, setting.selector, rsa_key, ed))
    return loaded, problems
