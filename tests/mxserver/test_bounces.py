"""The shared bounce taxonomy (common.bounces), table-driven from tests/data/mx/taxonomy.tsv."""

from __future__ import annotations

from pathlib import Path

import pytest

from common import bouncerules, bounces

REPO = Path(__file__).resolve().parents[2]
ROWS = [
    line.split("\t")
    for line in (REPO / "tests/data/mx/taxonomy.tsv").read_text().splitlines()
    if line and not line.startswith("#")
]


@pytest.mark.parametrize(("classification", "kind", "suppress", "text"), ROWS, ids=[r[3][:60] for r in ROWS])
def test_taxonomy(classification: str, kind: str, suppress: str, text: str) -> None:
    verdict = bouncerules.classify(text)
    assert (verdict.classification, verdict.type, verdict.suppress) == (classification, kind, suppress == "true")


def test_table_covers_every_failure_classification() -> None:
    seen = {row[0] for row in ROWS}
    assert seen >= set(bounces.CLASSIFICATIONS) - {"expired", "autoreply"}


def test_expired_is_soft_and_never_suppresses() -> None:
    verdict = bouncerules.classify("connect to mx.example.org[192.0.2.25]:25: Connection timed out", expired=True)
    assert (verdict.classification, verdict.type, verdict.suppress) == ("expired", "soft", False)


def test_status_decides_when_the_text_says_nothing() -> None:
    assert bouncerules.classify("550 5.1.1 go away").classification == "user-unknown"
    assert bouncerules.classify("x", code=552, status="5.2.2").classification == "mailbox-full"
    assert bouncerules.classify("550 5.7.27 x").classification == "auth-failure"


@pytest.mark.parametrize(
    ("text", "code", "status"),
    [
        ("554: delivery error: dd This user", 554, None),
        ("host mx[2001:db8:250::1] said: 550 5.1.1 x", 550, "5.1.1"),
        ("at 10:20:31 on 14.03.2024", None, None),
        ("smtp;550 5.1.10 RESOLVER", 550, "5.1.10"),
        ("<EXCH2003.legacy.example #5.1.1>", None, "5.1.1"),
    ],
)
def test_parse_reply(text: str, code: int | None, status: str | None) -> None:
    assert bounces.parse_reply(text) == (code, status)
