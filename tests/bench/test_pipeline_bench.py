"""bench/pipeline's third contender: Postfix + OpenDKIM must really sign, and the count must see it.

The benchmark compares the pipeline with Postfix + an OpenDKIM milter; a milter that let mail
through unsigned would make that a false comparison.  So: the signature counter reads
``smtp-sink -D`` files correctly, and a real Postfix with the benchmark's OpenDKIM configuration
hands the sink messages whose signature verifies (relaxed/relaxed, RSA-2048) against the
generated public key.
"""

from __future__ import annotations

import re
import shutil
import smtplib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import loadgen  # bench/ is a directory of scripts, not a package
import pipeline_bench

from devtools import testing
from devtools.servers import wait_until

DUMP = (
    b"X-Client-Addr: 127.0.0.1\n"
    b"X-Client-Proto: ESMTP\n"
    b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.test; s=opendkim;\n"
    b"\tb=abc\n"
    b"From: a@example.test\n"
    b"\n"
    b"body\n"
    b"\n"
    b"X-Client-Addr: 127.0.0.1\n"
    b"X-Client-Proto: ESMTP\n"
    b"From: a@example.test\n"
    b"\n"
    b"DKIM-Signature: only in the body, so not a signature\n"
    b"\n"
)


def test_count_signed_counts_header_signatures_only(tmp_path: Path) -> None:
    dump = tmp_path / "sink.dump"
    dump.write_bytes(DUMP)
    messages, signed, sample = pipeline_bench.count_signed(dump)
    assert (messages, signed) == (2, 1)
    assert sample.startswith("DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.test")


def test_count_signed_of_a_missing_dump_is_zero(tmp_path: Path) -> None:
    assert pipeline_bench.count_signed(tmp_path / "none.dump") == (0, 0, "")


@pytest.fixture
def work() -> Iterator[Path]:
    """A world-traversable directory (Postfix and smtp-sink drop to the postfix user)."""
    path = Path(tempfile.mkdtemp(prefix="pfdkim-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.postfix
def test_postfix_with_opendkim_signs_every_message_verifiably(work: Path) -> None:
    if shutil.which("opendkim") is None and not Path("/usr/sbin/opendkim").exists():
        pytest.skip("opendkim is not installed (Debian: apt-get install opendkim opendkim-tools)")
    opendkim = pipeline_bench.OpenDkim(testing.SENDER_DOMAIN)
    signing = None
    try:
        signing = pipeline_bench.PostfixAlone(work, "postfix-opendkim", opendkim)
        raw = loadgen.message("dkimtest", "rcpt@dest.test", 10_240, f"news@{testing.SENDER_DOMAIN}")
        with smtplib.SMTP("127.0.0.1", signing.smtpd_port, local_hostname="client.test", timeout=30) as client:
            for _ in range(3):
                client.sendmail(f"news@{testing.SENDER_DOMAIN}", ["rcpt@dest.test"], raw)
        wait_until(lambda: pipeline_bench.count_signed(signing.dump)[0] >= 3, timeout_s=30, what="three messages")
        assert pipeline_bench.count_signed(signing.dump)[:2] == (3, 3)

        public = (opendkim.directory / "keys" / f"{opendkim.SELECTOR}.txt").read_text()
        key = "".join(re.findall(r'"([^"]*)"', public)).replace(" ", "").encode()
        first = signing.dump.read_bytes().split(b"\nX-Client-Addr: ")[0]
        message = first.split(b"\n", 1)[1]  # drop the first X-Client-Addr line
        headers, body = message.split(b"\n\n", 1)
        kept = b"\n".join(
            line
            for line in headers.split(b"\n")
            if not re.match(rb"X-(Client-Proto|Helo-Args|Mail-Args|Rcpt-Args):", line)
        )
        signed = (kept + b"\n\n" + body).replace(b"\n", b"\r\n")
        assert b"c=relaxed/relaxed" in signed
        assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: key)
    finally:
        if signing is not None:
            signing.close()
        opendkim.close()
