"""``transformer-dkim check`` against a DNS server on loopback: a correct zone passes, a broken one
names each wrong record (and the record to publish)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from common.config import Config
from common.dkimkeys import generate_ed25519_seed, load_private_key, public_key_record
from devtools import testing
from devtools.dnsserver import DnsServer, dns_server
from transformer import dkimtool

SENDING_IP, MX_IP = "192.0.2.10", "192.0.2.20"
DOMAIN, RP = testing.SENDER_DOMAIN, testing.RETURN_PATH_DOMAIN
PTR = "10.2.0.192.in-addr.arpa"


@pytest.fixture
def config(make_config, tmp_path: Path) -> Config:
    ed = tmp_path / "dkim.ed25519"
    ed.write_bytes(generate_ed25519_seed())
    override = {
        "transformer": {
            "domain-settings": [
                {
                    "domain": DOMAIN,
                    "dkim-private-key-file": str(testing.write_key(tmp_path)),
                    "return-path-domain": RP,
                    "selector": testing.SELECTOR,
                    "ed25519-private-key-file": str(ed),
                    "ed25519-selector": "ed",
                }
            ]
        },
        "common-config": {"dns-check": {"sending-ips": [SENDING_IP], "mx-host": "mx.example.test"}},
    }
    result: Config = make_config(override)
    return result


def correct_zone(config: Config) -> dict[tuple[str, str], list[str]]:
    ds = config.transformer.domain_settings[0]
    rsa = load_private_key(ds.dkim_private_key_file, "rsa")
    assert ds.ed25519_private_key_file is not None
    ed = load_private_key(ds.ed25519_private_key_file, "ed25519")
    return {
        (f"{testing.SELECTOR}._domainkey.{DOMAIN}", "TXT"): [public_key_record(rsa)],
        (f"ed._domainkey.{DOMAIN}", "TXT"): [public_key_record(ed)],
        (RP, "TXT"): ["v=spf1 include:_spf.example.test -all", "google-site-verification=x"],
        ("_spf.example.test", "TXT"): [f"v=spf1 ip4:{SENDING_IP}/31 ~all"],
        (f"_dmarc.{DOMAIN}", "TXT"): ["v=DMARC1; p=none; rua=mailto:dmarc@example.test"],
        (RP, "MX"): ["10 mx.example.test."],
        ("mx.example.test", "A"): [MX_IP],
        ("mta.example.test", "A"): [SENDING_IP],  # postfixlog main-cf myhostname of the test config
        (PTR, "PTR"): ["mta.example.test."],
    }


@pytest.fixture
def dns(config: Config) -> Iterator[DnsServer]:
    with dns_server(correct_zone(config), address="127.0.0.1", port=0) as server:
        yield server


def run(config: Config, server: DnsServer, *extra: str) -> tuple[int, list[str]]:
    out = io.StringIO()
    status = dkimtool.main(
        [
            "check",
            "--global-config-file",
            str(config.global_path),
            "--customer-config-file",
            str(config.customer_path),
            "--nameserver",
            f"127.0.0.1:{server.port}",
            "--dns-timeout",
            "0.3",
            *extra,
        ],
        out,
    )
    return status, out.getvalue().splitlines()


def test_a_correctly_published_zone_passes_every_check(config: Config, dns: DnsServer) -> None:
    status, lines = run(config, dns)
    checks = lines[:-1]
    assert status == 0, lines
    assert [line.split()[0] for line in checks] == ["OK"] * len(checks), lines
    names = [line.split()[2].rstrip(":") for line in checks]
    assert names == ["dkim", "dkim-ed25519", "spf", "dmarc", "mx", "helo-a", "helo-ptr"]
    assert "DKIM aligned (d=example.test), SPF aligned (bounces.example.test)" in lines[3]
    assert lines[-1] == "7 checks: 0 failed, 0 warnings"


def test_a_broken_zone_names_each_wrong_record_and_what_to_publish(config: Config, dns: DnsServer) -> None:
    ds = config.transformer.domain_settings[0]
    expected_dkim = public_key_record(load_private_key(ds.dkim_private_key_file, "rsa"))
    dns.set(f"{testing.SELECTOR}._domainkey.{DOMAIN}", "TXT", [public_key_record(_other_key())])
    dns.set(f"ed._domainkey.{DOMAIN}", "TXT", None)
    dns.set("_spf.example.test", "TXT", ["v=spf1 ip4:198.51.100.1 -all"])
    dns.set(f"_dmarc.{DOMAIN}", "TXT", None)
    dns.set(RP, "MX", ["10 mx.elsewhere.test."])
    dns.set(PTR, "PTR", ["host-10.provider.test."])
    status, lines = run(config, dns)
    assert status == 1
    by_name = {line.split()[2].rstrip(":"): line for line in lines[:-1]}
    assert by_name["dkim"].startswith("FAIL") and "another key" in by_name["dkim"]
    assert f'publish: mailer._domainkey.{DOMAIN}. 3600 IN TXT "{expected_dkim}"' in by_name["dkim"]
    assert (
        by_name["dkim-ed25519"].startswith("FAIL")
        and f"no DKIM record at ed._domainkey.{DOMAIN}" in by_name["dkim-ed25519"]
    )
    assert by_name["spf"].startswith("FAIL") and f"does not authorise {SENDING_IP} (fail)" in by_name["spf"]
    assert f'"v=spf1 ip4:{SENDING_IP} include:_spf.example.test -all"' in by_name["spf"]
    assert by_name["dmarc"].startswith("FAIL") and f"_dmarc.{DOMAIN}. 3600 IN TXT" in by_name["dmarc"]
    assert by_name["mx"].startswith("FAIL") and "points at mx.elsewhere.test, not at mx.example.test" in by_name["mx"]
    assert by_name["helo-a"].startswith("OK")
    assert (
        by_name["helo-ptr"].startswith("FAIL")
        and f"publish: {PTR}. 3600 IN PTR mta.example.test." in by_name["helo-ptr"]
    )
    assert lines[-1] == "7 checks: 6 failed, 0 warnings"


def test_missing_inputs_are_warnings_and_a_silent_dns_is_a_failure(config: Config, dns: DnsServer) -> None:
    dns.set(f"_dmarc.{DOMAIN}", "TXT", ["v=DMARC1; p=reject; aspf=s"])
    status, lines = run(config, dns, "--helo-name", "mta.example.test")
    assert status == 0
    (dmarc,) = [line for line in lines if " dmarc: " in line]
    assert dmarc.startswith("WARN") and "SPF not aligned" in dmarc and "aspf=s" in dmarc
    # A server that does not answer: every lookup fails, loudly.
    silent = DnsServer({}, address="127.0.0.1", port=0)  # bound but never started
    try:
        status, lines = run(config, silent, "--dns-timeout", "0.05")
    finally:
        silent.sock.close()
    assert status == 1 and all(line.startswith("FAIL") for line in lines[:-1]) and "did not answer" in lines[0]


def _other_key() -> Any:
    """An RSA key that is not the configured one."""
    return load_pem_private_key(testing.rsa_pem(2048, 1), password=None)
