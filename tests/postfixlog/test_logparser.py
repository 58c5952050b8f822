"""The log parser and interpreter against recorded Postfix log excerpts (tests/data/postfix)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from postfixlog.interpreter import Interpreter
from postfixlog.logparser import parse
from postfixlog.records import Delivery

DATA = Path(__file__).parents[1] / "data" / "postfix"
CASES = sorted(p.stem for p in DATA.glob("*.log"))


def _run(case: str) -> tuple[Any, dict[str, Any]]:
    expected = json.loads((DATA / f"{case}.expected.json").read_text())
    lines = [parse(raw) for raw in (DATA / f"{case}.log").read_text().splitlines()]
    tokens = {k: Delivery(**v) for k, v in expected["records"]["tokens"].items()}
    qids = {k: Delivery(**v) for k, v in expected["records"]["qids"].items()}
    needed_tokens, needed_qids = Interpreter().needs(lines)
    assert set(tokens) <= needed_tokens
    assert set(qids) <= needed_qids
    return Interpreter().apply(lines, tokens, qids), expected


@pytest.mark.parametrize("case", CASES)
def test_log_excerpt_gives_expected_events(case: str) -> None:
    effects, expected = _run(case)
    got = []
    for event in effects.events:
        record = event.to_dict()
        record.pop("timestamp")
        record.pop("event_id")
        got.append(record)
    assert got == expected["events"]
    for key, count in expected["counts"].items():
        assert effects.counts[key] == count, key


@pytest.mark.parametrize("case", CASES)
def test_event_ids_name_one_attempt_and_are_stable(case: str) -> None:
    # One event per (queue id, recipient, attempt): ids differ between events and are the same
    # when the same lines are read again.
    first, _ = _run(case)
    again, _ = _run(case)
    ids = [e.event_id for e in first.events]
    assert len(set(ids)) == len(ids)
    assert ids == [e.event_id for e in again.events]


def test_every_case_has_expectations() -> None:
    assert CASES
    for case in CASES:
        assert (DATA / f"{case}.expected.json").exists(), case


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        ("Nov 25 13:30:03 mta postfix/qmgr[1]: 4jZLBz5lN8zJFtX: removed", "removed"),  # 'z' in the time part
        ("Nov 25 13:30:03 mta postfix/qmgr[1]: B39B421EAF7: removed", "removed"),  # short hex id
        ("Nov 25 13:30:03 mta postfix/smtpd[1]: warning: hostname x does not resolve", "other"),
        ("Nov 25 13:30:03 mta postfix/smtpd[1]: NOQUEUE: reject: RCPT from x[1.2.3.4]: 554", "other"),
        ("2026-11-25T13:30:03.123456+00:00 mta postfix/qmgr[1]: B39B421EAF7: removed", "removed"),
        ("Nov 25 13:30:03 mta postfix/qmgr[1]: 4jZLBz5lN8zJFtX: from=<>, size=2, nrcpt=1 (queue active)", "from"),
        # What PostfixLog's own postsuper calls log (withdrawing a paused provider's mail).
        ("Dec 07 04:23:08 mta postfix/postsuper[17564]: 4jjTVM4H20zL8Nt: placed on hold", "other"),
        ("Dec 07 04:23:08 mta postfix/postsuper[17591]: 4jjTVM4H20zL8Nt: removed", "removed"),
        ("Dec 07 04:23:08 mta postfix/ib_a/smtp[1]: 4jjTVQ715zzL8wv: host mx.a.test[127.0.0.1] said: 421 x", "other"),
        ("", "unparsed"),
        ("\x00\x01 binary", "unparsed"),
    ],
)
def test_line_kinds(line: str, kind: str) -> None:
    assert parse(line).kind == kind


def test_null_sender_mail_produces_no_event() -> None:
    # Postfix' own notifications (null sender) have no PostfixLog record: no event, counted.
    lines = [
        parse("Nov 25 13:50:01 mta postfix/qmgr[2]: 4jZLX0fGhJzJDDD: from=<>, size=2345, nrcpt=1 (queue active)"),
        parse(
            "Nov 25 13:50:01 mta postfix/smtp[3]: 4jZLX0fGhJzJDDD: to=<bounce-u2-t@bounces.example.test>, "
            "relay=127.0.0.1[127.0.0.1]:2526, delay=0.02, delays=0/0.01/0/0, dsn=2.0.0, status=sent (250 ok)"
        ),
    ]
    effects = Interpreter().apply(lines, {}, {"4jZLX0fGhJzJDDD": None})
    assert effects.events == []
    assert effects.counts["foreign"] == 1
