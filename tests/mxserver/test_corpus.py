"""The classifier over the corpus in tests/data/mx: one case per message, expectations in a sidecar.

Each ``<name>.eml`` has ``<name>.expected.json``::

    {"rcpt": [envelope recipients], "kind": "bounce", "report": "dsn", "note~": "...",
     "events": [{"event": "bounce", "uuid": "...", "reason~": "substring", "email": null, ...}]}

Every listed key must match the event record (``null`` = absent); ``key~`` is a substring test.
Tagged addresses in the corpus were made with the test secret (devtools.testing).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from common.addressing import AddressSigner
from devtools.testing import RETURN_PATH_DOMAIN, SENDER_DOMAIN
from mxserver.classifier import Classifier

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "tests/data/mx"
CASES = sorted(CORPUS.rglob("*.eml"))
NOW = 1_710_000_000


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    return Classifier(
        signer=AddressSigner(b"test-address-secret-0123456789abcdef"),
        return_path_domains=frozenset({RETURN_PATH_DOMAIN}),
        abuse_addresses=frozenset({f"fbl@{RETURN_PATH_DOMAIN}"}),
        from_domains={RETURN_PATH_DOMAIN: SENDER_DOMAIN},
    )


def _expected(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.with_name(path.stem + ".expected.json").read_text())
    return data


def _check(record: dict[str, Any], want: dict[str, Any]) -> None:
    for key, value in want.items():
        if key.endswith("~"):
            assert value in str(record.get(key[:-1])), f"{key[:-1]}: {value!r} not in {record.get(key[:-1])!r}"
        else:
            assert record.get(key) == value, f"{key}: {record.get(key)!r} != {value!r} in {record}"


@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
@pytest.mark.parametrize("path", CASES, ids=[str(c.relative_to(CORPUS)) for c in CASES])
def test_corpus_message_is_classified_as_expected(classifier: Classifier, path: Path, crlf: bool) -> None:
    # The rule pinned per file: kind, report format and every listed event field.
    expected = _expected(path)
    raw = path.read_bytes()
    if crlf:
        raw = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    result = classifier.classify(expected["rcpt"], raw, now=NOW)
    assert result.kind == expected["kind"], f"{result.kind} ({result.report}): {result.note}"
    if "report" in expected:
        assert result.report == expected["report"]
    if "note~" in expected:
        assert expected["note~"] in result.note
    assert len(result.events) == len(expected["events"]), [e.to_dict() for e in result.events]
    for event, want in zip(result.events, expected["events"], strict=True):
        record = event.to_dict()
        assert record["timestamp"] == NOW
        _check(record, want)


def test_corpus_is_large_and_varied() -> None:
    # Acceptance: >= 60 messages; DSNs from >= 15 MTAs/providers; several ARF providers.
    assert len(CASES) >= 60
    for case in CASES:
        assert case.with_name(case.stem + ".expected.json").exists(), f"{case.name} has no expectation"
    kinds = Counter(_expected(c)["kind"] for c in CASES)
    assert kinds["bounce"] + kinds["deferred"] >= 25
    assert kinds["spam-report"] >= 5
    assert kinds["autoreply"] >= 10
    assert kinds["unsubscribe"] >= 4
    assert kinds["unclassified"] >= 10
    bounce_files = [c for c in CASES if c.parent.name in ("dsn", "text")]
    reporters = {_reporting_system(c) for c in bounce_files}
    assert len(reporters) >= 15, sorted(reporters)


def _reporting_system(path: Path) -> str:
    # The file names start with the MTA/provider: postfix-…, gmail-…, office365-…
    return path.stem.split("-")[0]


def test_event_ids_are_stable_and_distinct(classifier: Classifier) -> None:
    # The same report received twice yields the same event ids; different reports differ.
    ids: set[str] = set()
    for path in CASES:
        expected = _expected(path)
        raw = path.read_bytes()
        first = classifier.classify(expected["rcpt"], raw, now=NOW)
        again = classifier.classify(expected["rcpt"], raw, now=NOW + 3600)
        assert [e.event_id for e in first.events] == [e.event_id for e in again.events]
        for event in first.events:
            assert event.event_id not in ids, f"{path.name}: duplicate event id"
            ids.add(event.event_id)
    assert len(ids) >= 50
