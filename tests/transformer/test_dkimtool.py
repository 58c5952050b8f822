"""transformer-dkim: generated keys load, and the printed records publish exactly those keys."""

from __future__ import annotations

import io
import re
import stat
from pathlib import Path

import dkim
import pytest

from common.dkimkeys import load_private_key, public_key_record
from devtools import testing
from transformer import dkimtool


def _txt_value(output: str, name: str) -> str:
    line = next(ln for ln in output.splitlines() if ln.startswith(name + " "))
    return "".join(re.findall(r'"([^"]*)"', line))


def test_generate_writes_private_keys_and_prints_every_record(tmp_path: Path) -> None:
    out = io.StringIO()
    code = dkimtool.main(
        [
            "generate", "example.com", "--return-path-domain", "bounces.example.com",
            "--mx-host", "mx.example.com", "--sending-ip", "192.0.2.10", "--sending-ip", "2001:db8::/64",
            "--ed25519-selector", "ed", "--output-dir", str(tmp_path),
        ],
        out,
    )  # fmt: skip
    assert code == 0
    text = out.getvalue()
    rsa_path, ed_path = tmp_path / "dkim-example.com.pem", tmp_path / "dkim-example.com.ed25519"
    assert stat.S_IMODE(rsa_path.stat().st_mode) == 0o600
    rsa = load_private_key(rsa_path, "rsa")
    assert getattr(rsa, "key_size", 0) == 2048
    ed = load_private_key(ed_path, "ed25519")
    assert _txt_value(text, "mailer._domainkey.example.com. 3600 IN TXT") == public_key_record(rsa)
    assert _txt_value(text, "ed._domainkey.example.com. 3600 IN TXT") == public_key_record(ed)
    assert all(len(s) <= 255 for s in re.findall(r'"([^"]*)"', text))
    assert "bounces.example.com. 3600 IN MX 10 mx.example.com." in text
    assert 'bounces.example.com. 3600 IN TXT "v=spf1 ip4:192.0.2.10 ip6:2001:db8::/64 -all"' in text
    assert '_dmarc.example.com. 3600 IN TXT "v=DMARC1; p=none;' in text
    assert "WARNING" not in text
    assert "- domain: example.com\n  dkim-private-key-file: dkim-example.com.pem\n" in text

    # The printed record verifies a signature made with the written key (dkimpy, test DNS).
    record = _txt_value(text, "mailer._domainkey.example.com. 3600 IN TXT").encode()
    pem = rsa_path.read_bytes()
    message = b"From: a@example.com\r\nTo: b@dest.test\r\nSubject: x\r\n\r\nhi\r\n"
    signed = dkim.sign(message, b"mailer", b"example.com", pem, include_headers=[b"from"]) + message
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: record)


def test_generate_refuses_to_overwrite_and_warns_about_alignment(tmp_path: Path, capsys) -> None:
    args = [
        "generate",
        "example.com",
        "--return-path-domain",
        "returns.other.net",
        "--bits",
        "1024",
        "--output-dir",
        str(tmp_path),
    ]
    out = io.StringIO()
    assert dkimtool.main(args, out) == 0
    assert "WARNING: returns.other.net is not example.com or a subdomain" in out.getvalue()
    assert "mxserver.example.com" in out.getvalue()
    assert dkimtool.main(args, io.StringIO()) == 1
    assert "exists; use --force" in capsys.readouterr().err
    assert dkimtool.main([*args, "--force"], io.StringIO()) == 0


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        dkimtool.main(["generate", "example.com", "--sending-ip", "not-an-ip", "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        dkimtool.main(["generate", "example.com", "--bits", "512", "--output-dir", str(tmp_path)])


def test_records_of_a_configuration(tmp_path: Path) -> None:
    customer = testing.customer_config(tmp_path, redis_port=6379)
    gpath, cpath = testing.write_configs(tmp_path / "configs", customer)
    out = io.StringIO()
    code = dkimtool.main(["records", "--global-config-file", str(gpath), "--customer-config-file", str(cpath)], out)
    assert code == 0
    key = load_private_key(Path(customer["transformer"]["domain-settings"][0]["dkim-private-key-file"]), "rsa")
    assert _txt_value(out.getvalue(), "mailer._domainkey.example.test. 3600 IN TXT") == public_key_record(key)
    assert "bounces.example.test. 3600 IN MX 10 mxserver.example.test." in out.getvalue()
