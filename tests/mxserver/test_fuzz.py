"""Property tests: nothing a stranger sends can make the classifier raise or hang.

The MX is public: arbitrary bytes, mangled MIME (truncated, spliced, re-encoded corpus
messages) and hostile shapes (huge lines, deep nesting) must give a Classification, never an
exception, in bounded time.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import bouncerules, bounces
from common.addressing import valid_uuid
from devtools import mxcorpus
from devtools.testing import RETURN_PATH_DOMAIN
from mxserver import arf, dsn, mime, textbounces
from mxserver.classifier import records_of
from mxserver.verification import Outcome
from tests.mxserver.conftest import CLASSIFIER

SAMPLES = [(c.raw, c.rcpt, records_of(c.records)) for c in mxcorpus.cases()]
KINDS = {"unsubscribe", "spam-report", "bounce", "deferred", "autoreply", "unclassified", "unverified", "own-report"}
# MX_FUZZ_EXAMPLES=20000 for a long run; the default keeps the suite fast.
FUZZ = settings(
    max_examples=int(os.environ.get("MX_FUZZ_EXAMPLES", "250")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def check(result: Outcome) -> None:
    assert result.kind in KINDS
    assert (result.kind in ("unclassified", "unverified", "own-report")) == (not result.events)
    for event in result.events:
        assert event.uuid is not None and valid_uuid(event.uuid)
        record = event.to_dict()
        assert record["event"] in ("bounce", "deferred", "unsubscribe", "spam-report")
        if record.get("classification") is not None:
            assert record["classification"] in bounces.CLASSIFICATIONS


recipients = st.lists(
    st.one_of(st.text(max_size=80), st.sampled_from([r for _, rcpts, _ in SAMPLES for r in rcpts])), max_size=4
)


@FUZZ
@given(raw=st.binary(max_size=5000), rcpts=recipients)
def test_arbitrary_bytes_never_raise(raw: bytes, rcpts: list[str]) -> None:
    check(CLASSIFIER.classify(rcpts, raw, now=1))


@st.composite
def mangled(draw: st.DrawFn) -> tuple[bytes, list[str], dict[str, Any]]:
    raw, rcpts, records = draw(st.sampled_from(SAMPLES))
    data = bytearray(raw)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "delete", "splice", "insert", "lf", "header", "dup"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "truncate":
            del data[at:]
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 400))]
        elif op == "splice":
            data[at : at + draw(st.integers(0, 50))] = draw(st.binary(max_size=50))
        elif op == "insert":
            data[at:at] = draw(
                st.sampled_from(
                    [
                        b"\n--",
                        b'\nContent-Type: multipart/report; report-type=delivery-status; boundary="x"\n',
                        b"\nContent-Type: message/delivery-status\n\n",
                        b"\nContent-Transfer-Encoding: base64\n",
                        b"=?utf-8?B?!!!?=",
                        b"=?x-unknown-charset?Q?abc?=",
                        b"\nAction: failed\nStatus: 5.9.999999\n",
                        b"\xff\xfe\x00\x80",
                        b"\n\n\n",
                    ]
                )
            )
        elif op == "lf":
            data = bytearray(bytes(data).replace(b"\n", b"\r\n"))
        elif op == "header":
            name = draw(st.sampled_from(["Content-Type", "Subject", "From", "Auto-Submitted", "X-Failed-Recipients"]))
            value = draw(st.text(max_size=60)).encode("utf-8", "surrogatepass")
            data[0:0] = name.encode() + b": " + value + b"\n"
        else:
            chunk = bytes(data[at : at + draw(st.integers(1, 300))])
            data[at:at] = chunk * draw(st.integers(1, 5))
    return bytes(data), rcpts, records


@FUZZ
@given(sample=mangled())
def test_mangled_corpus_never_raises(sample: tuple[bytes, list[str], dict[str, Any]]) -> None:
    raw, rcpts, records = sample
    check(CLASSIFIER.classify(rcpts, raw, records=records, now=1))


field = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=120)
FIELD_NAMES = [
    "Final-Recipient",
    "Original-Recipient",
    "Action",
    "Status",
    "Diagnostic-Code",
    "Remote-MTA",
    "Feedback-Type",
    "Original-Mail-From",
    "Original-Rcpt-To",
    "X-Junk",
]


@st.composite
def generated_report(draw: st.DrawFn) -> bytes:
    """A syntactically plausible multipart/report with random field values."""
    report_type = draw(st.sampled_from(["delivery-status", "feedback-report", "global-delivery-status", ""]))
    part_type = draw(
        st.sampled_from(["message/delivery-status", "message/feedback-report", "message/global-delivery-status"])
    )
    fields = "\n".join(f"{draw(st.sampled_from(FIELD_NAMES))}: {draw(field)}" for _ in range(draw(st.integers(0, 12))))
    original = draw(st.sampled_from(["message/rfc822", "text/rfc822-headers", "message/global-headers", "text/plain"]))
    text = (
        f"From: {draw(field)}\nTo: {draw(field)}\nSubject: {draw(field)}\nMIME-Version: 1.0\n"
        f'Content-Type: multipart/report; report-type={report_type}; boundary="b"\n\n'
        f"--b\nContent-Type: text/plain\n\n{draw(field)}\n"
        f"--b\nContent-Type: {part_type}\n\nReporting-MTA: dns; x\n\n{fields}\n"
        f"--b\nContent-Type: {original}\n\nReturn-Path: <{draw(field)}>\nMessage-ID: <{draw(field)}>\n\n"
        f"{draw(field)}\n--b--\n"
    )
    return text.encode("utf-8", "surrogatepass")


@FUZZ
@given(raw=generated_report(), rcpts=recipients)
def test_generated_reports_never_raise(raw: bytes, rcpts: list[str]) -> None:
    check(CLASSIFIER.classify(rcpts, raw, now=1))
    msg = mime.parse(raw)
    dsn.parse(msg, raw)
    arf.parse(msg)
    textbounces.parse(msg, mime.body_text(msg))


@FUZZ
@given(text=st.text(max_size=3000))
def test_bounce_taxonomy_never_raises(text: str) -> None:
    verdict = bouncerules.classify(text)
    assert verdict.classification in bounces.CLASSIFICATIONS
    assert not verdict.suppress or verdict.classification in bounces.DEAD_ADDRESS


HOSTILE = {
    "long-local-part": b"From: x\n\n" + b"a" * 200_000 + b"@",
    "many-codes": b"From: MAILER-DAEMON@x\nSubject: Undelivered Mail\n\n" + b"550-5.1.1 " * 20_000,
    "angle-brackets": b"Subject: failure notice\nFrom: MAILER-DAEMON@x\n\n" + b"<" * 200_000,
    "long-header": b"Subject: " + b"=?utf-8?B?" * 20_000 + b"\n\nx",
    "header-lines": b"X-Failed-Recipients: a@b.c\n" + b"Received: from x\n" * 30_000 + b"\nbody",
    "deep-nesting": b"".join(b'Content-Type: multipart/mixed; boundary="b%d"\n\n--b%d\n' % (i, i) for i in range(600)),
    "many-addresses": b"X-Failed-Recipients: a@b.c\nSubject: Undeliverable\n\n"
    + b"".join(b"user%d@example%d.org\n" % (i, i) for i in range(20_000)),
    "many-blank-blocks": b'Content-Type: multipart/report; boundary="b"\n\n'
    + b"--b\nContent-Type: message/delivery-status\n\n"
    + b"Action: failed\nStatus: 5.1.1\nFinal-Recipient: rfc822; a@b.c\n\n" * 5_000,
    # 70 KB of nested multiparts (the stdlib parser would recurse ~1500 levels deep).
    "mime-bomb-nested": b"From: a@b.c\nSubject: x\nMIME-Version: 1.0\n"
    + b"".join(b'Content-Type: multipart/mixed; boundary="b%d"\n\n--b%d\n' % (i, i) for i in range(1500)),
    # Thousands of parts.
    "mime-bomb-wide": b'From: a@b.c\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"\n\n'
    + b"".join(b"--b\nContent-Type: text/plain\n\nx@y.z failed 550\n" for _ in range(5000))
    + b"--b--\n",
    # Nested message/rfc822 parts.
    "nested-messages": b"From: a@b.c\nSubject: x\n"
    + b"MIME-Version: 1.0\nContent-Type: message/rfc822\n\n" * 1500
    + b"Subject: inner\n\nbody\n",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_shapes_are_classified_quickly(name: str) -> None:
    # No regular expression or walk may go quadratic (or recurse without bound).
    start = time.perf_counter()
    check(CLASSIFIER.classify([f"postmaster@{RETURN_PATH_DOMAIN}"], HOSTILE[name], now=1))
    assert time.perf_counter() - start < 5.0
