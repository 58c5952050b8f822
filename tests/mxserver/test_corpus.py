"""The classifier over the corpus in tests/data/mx: one case per message, expectations in a sidecar.

Each ``<name>.eml`` has ``<name>.expected.json`` (format in ``tests/data/mx/README.md``): the
envelope recipients, the kind, and the events with the fields to check (``null`` = absent,
``key~`` = substring).  Placeholders are expanded with the test secret and the Transformer's
records are those the genuine placeholders stand for (``devtools.mxcorpus``).  Every message is
tried with LF and with CRLF line endings.  The figures per classification and MTA family are
printed at the end of the run ("MX corpus").
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import pytest

from devtools import mxcorpus
from mxserver.classifier import records_of
from mxserver.verification import Outcome, verify
from tests.mxserver.conftest import CLASSIFIER, CORPUS_RESULTS

CASES = mxcorpus.cases()
NOW = 1_710_000_000


def problems(case: mxcorpus.Case, outcome: Outcome) -> list[str]:
    """How ``outcome`` differs from the case's expectation (empty when it passes)."""
    expected = case.expected
    found: list[str] = []
    if outcome.kind != expected["kind"]:
        found.append(f"kind {outcome.kind} ({outcome.report}: {outcome.reason} {outcome.note}) != {expected['kind']}")
    if len(outcome.events) != len(expected["events"]):
        found.append(
            f"{len(outcome.events)} events != {len(expected['events'])}: {[e.to_dict() for e in outcome.events]}"
        )
        return found
    for event, want in zip(outcome.events, expected["events"], strict=True):
        record = event.to_dict()
        if record["timestamp"] != NOW:
            found.append("timestamp")
        found.extend(_mismatches(record, want))
    return found


def _mismatches(record: dict[str, Any], want: dict[str, Any]) -> list[str]:
    out = []
    for key, value in want.items():
        if key.endswith("~"):
            if value not in str(record.get(key[:-1])):
                out.append(f"{key[:-1]}: {value!r} not in {record.get(key[:-1])!r}")
        elif record.get(key) != value:
            out.append(f"{key}: {record.get(key)!r} != {value!r} (reason {record.get('reason')!r})")
    return out


def _classification(case: mxcorpus.Case) -> str:
    events = case.expected["events"]
    if events and events[0].get("classification"):
        return f"{case.kind}/{events[0]['classification']}"
    return case.kind


@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus_message_is_classified_as_expected(case: mxcorpus.Case, crlf: bool) -> None:
    # Kind, number of events and every listed field, as the MX decides with the records in Redis.
    raw = case.with_crlf() if crlf else case.raw
    outcome = CLASSIFIER.classify(case.rcpt, raw, records=records_of(case.records), now=NOW)
    found = problems(case, outcome)
    if not crlf:
        CORPUS_RESULTS["per classification"][(_classification(case), not found)] += 1
        CORPUS_RESULTS["per MTA family"][(str(case.expected["mta"]), not found)] += 1
    assert not found, found


def test_corpus_is_large_and_varied() -> None:
    # Issue 14: at least 250 messages from at least 40 MTAs/providers, every group represented.
    assert len(CASES) >= 250
    families = {c.expected["mta"] for c in CASES} - {"human", "unknown"}
    assert len(families) >= 40, sorted(families)
    groups = Counter(c.expected["group"] for c in CASES)
    for group in (
        "text-vendor",
        "dsn-broken-mime",
        "mailing-list",
        "dsn-status-vs-code",
        "sender-rejected",
        "dsn-no-diagnostic",
        "dsn-multi-recipient",
        "dsn-quoted-localpart",
        "dsn-encoded-word-localpart",
        "dead-address-wording",
        "forwarded-bounce",
        "ses-notification",
        "forgery",
        "own-report",
    ):
        assert groups[group] >= 3, group
    kinds = Counter(c.kind for c in CASES)
    assert kinds["unverified"] >= 10 and kinds["own-report"] >= 3


def test_event_ids_are_stable_and_distinct() -> None:
    # The same report received again (even with other line endings) yields the same event ids;
    # different reports differ.
    ids: set[str] = set()
    for case in CASES:
        records = records_of(case.records)
        first = CLASSIFIER.classify(case.rcpt, case.raw, records=records, now=NOW)
        again = CLASSIFIER.classify(case.rcpt, case.with_crlf(), records=records, now=NOW + 3600)
        assert [e.event_id for e in first.events] == [e.event_id for e in again.events], case.name
        for event in first.events:
            assert event.event_id not in ids, f"{case.name}: duplicate event id"
            ids.add(event.event_id)
    assert len(ids) >= 200


def test_without_records_the_report_names_decide() -> None:
    # Offline (no record, e.g. expired): a tag verifies only against an address the report names.
    # Every case then either gives the same events (the bound recipient in the report's spelling)
    # or, when the report does not name the recipient (redacted ARF, unsubscribe from another
    # address), no event at all -- never an event for somebody else.
    same = 0
    for case in CASES:
        offline = CLASSIFIER.classify(case.rcpt, case.raw, now=NOW)
        online = CLASSIFIER.classify(case.rcpt, case.raw, records=records_of(case.records), now=NOW)
        if not offline.events:
            assert offline.kind in ("unverified", online.kind), case.name
            continue
        assert [(e.uuid, str(e.recipient).lower()) for e in offline.events] == [
            (e.uuid, str(e.recipient).lower()) for e in online.events
        ], case.name
        assert [e.event_id for e in offline.events] == [e.event_id for e in online.events]
        same += 1
    assert same >= 230


def test_a_record_of_another_recipient_does_not_verify() -> None:
    # The record says who was sent the message: a genuine bounce tag whose recipient is no
    # longer (or never was) in it does not verify through the record.
    case = next(c for c in CASES if c.name == "dsn/postfix-user-unknown.eml")
    (uuid,) = case.records
    other = {uuid: ["somebody.else@example.org"]}
    analysis = CLASSIFIER.analyse(case.rcpt, case.raw)
    assert analysis.tags
    outcome = CLASSIFIER.classify(case.rcpt, case.raw, records=records_of(other), now=NOW)
    # The report names the bound recipient, so its HMAC still verifies the tag (source "report").
    assert [e.recipient for e in outcome.events] == ["jane.doe@example.org"]
    mangled = dataclasses.replace(analysis, candidates=())
    assert verify(mangled, records_of(other), CLASSIFIER.signer, now=NOW).kind == "unverified"
