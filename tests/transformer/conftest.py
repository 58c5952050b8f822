"""Helpers of the Transformer tests: golden-file loader, DKIM verifiers, a Transformer factory."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

import dkim
import pytest

from common.addressing import AddressSigner
from common.config.transformer import FeedbackId
from common.dkimkeys import PrivateKey, load_private_key, public_key_record
from transformer.settings import DomainProfile, Settings
from transformer.signer import DkimSigner, Signature
from transformer.transform import MessageTransformer

REPO = Path(__file__).resolve().parents[2]
KEYS = REPO / "tests/data/dkim/keys"
PERL_VERIFIER = Path(__file__).with_name("verify_dkim.pl")
SECRET = b"golden-secret"
NONCE = b"\x00" * 5
FEEDBACK = FeedbackId(campaign_id="newsletter", mail_type="marketing", sender_id="example-sender")


def key(name: str) -> PrivateKey:
    return load_private_key(KEYS / name, "ed25519" if name.startswith("ed25519") else "rsa")


def records_for(keys: Mapping[tuple[str, str], PrivateKey]) -> dict[str, str]:
    """TXT records {"<selector>._domainkey.<domain>": "v=DKIM1; ..."} for (domain, selector) keys."""
    return {f"{sel}._domainkey.{dom}": public_key_record(k) for (dom, sel), k in keys.items()}


def verify_dkimpy(raw: bytes, records: Mapping[str, str]) -> list[bool]:
    """dkimpy's verdict for each DKIM-Signature, top first."""
    table = {f"{name}.".encode(): value.encode() for name, value in records.items()}

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return table.get(name)

    count = sum(1 for line in raw.split(b"\r\n") if line.lower().startswith(b"dkim-signature:"))
    verdicts = []
    for i in range(count):
        try:
            verdicts.append(bool(dkim.DKIM(raw).verify(idx=i, dnsfunc=dnsfunc)))
        except dkim.DKIMException:
            verdicts.append(False)
    return verdicts


def verify_perl(raw: bytes, records: Mapping[str, str], tmp_path: Path) -> list[str]:
    """Mail::DKIM's verdict lines: '<algorithm> <domain> <selector> <result detail>'."""
    assert shutil.which("perl"), "perl is needed (Debian: libmail-dkim-perl)"
    table = tmp_path / "dkim-records.txt"
    table.write_text("".join(f"{name} {value}\n" for name, value in records.items()))
    proc = subprocess.run(
        ["perl", str(PERL_VERIFIER), str(table)], input=raw, capture_output=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode().splitlines()


def make_transformer(
    *,
    now: float = 1_700_000_000,
    domain: str = "example.test",
    selector: str = "mailer",
    rsa: str = "rsa2048.pem",
    ed25519: tuple[str, str] | None = None,
    return_path_domain: str = "bounces.example.test",
    beacon_url: str | None = None,
    unsubscribe_url: str | None = None,
    x_mailer: str | None = "Inboxbooster-Mailer",
    inject: Mapping[str, str] | None = None,
    feedback: FeedbackId = FEEDBACK,
    secret: bytes = SECRET,
) -> tuple[MessageTransformer, dict[str, str]]:
    """A transformer over the test keys with a fixed clock, and the TXT records to verify it."""

    def clock() -> float:
        return now

    keys: dict[tuple[str, str], PrivateKey] = {(domain, selector): key(rsa)}
    signatures = [Signature(domain, selector, keys[(domain, selector)])]
    if ed25519 is not None:
        keys[(domain, ed25519[1])] = key(ed25519[0])
        signatures.append(Signature(domain, ed25519[1], keys[(domain, ed25519[1])]))
    profile = DomainProfile(
        domain=domain,
        return_path_domain=return_path_domain,
        signer=DkimSigner(signatures, clock=clock),
        beacon_url=beacon_url,
        unsubscribe_url=unsubscribe_url,
    )
    settings = Settings(
        profiles={domain: profile},
        x_mailer=x_mailer,
        feedback=feedback,
        inject=tuple((inject or {}).items()),
    )
    # A fixed Message-ID nonce: with the fixed clock, every output is reproducible.
    transformer = MessageTransformer(settings, AddressSigner(secret), clock=clock, nonce=lambda: NONCE)
    return transformer, records_for(keys)


@pytest.fixture
def transformer_factory() -> Callable[..., tuple[MessageTransformer, dict[str, str]]]:
    return make_transformer


@pytest.fixture
def verifiers(tmp_path: Path) -> Callable[[bytes, Mapping[str, str]], tuple[list[bool], list[str]]]:
    """Both verifiers: (dkimpy verdicts, Mail::DKIM lines)."""

    def run(raw: bytes, records: Mapping[str, str]) -> tuple[list[bool], list[str]]:
        return verify_dkimpy(raw, records), verify_perl(raw, records, tmp_path)

    return run
