"""mxserver.dsn: recipient blocks of a delivery-status part, whatever order and spacing the MTA uses."""

from __future__ import annotations

import pytest

from mxserver import dsn

BLOCKS = {
    "blank lines, recipient first": (
        "Reporting-MTA: dns; mx.example.org\n\n"
        "Final-Recipient: rfc822; a@example.org\nAction: failed\nStatus: 5.1.1\n\n"
        "Final-Recipient: rfc822; b@example.org\nAction: delayed\nStatus: 4.2.2\n"
    ),
    "no blank lines": (
        "Reporting-MTA: dns; mx.example.org\n"
        "Final-Recipient: rfc822; a@example.org\nAction: failed\nStatus: 5.1.1\n"
        "Final-Recipient: rfc822; b@example.org\nAction: delayed\nStatus: 4.2.2\n"
    ),
    "Action before Final-Recipient": (
        "Reporting-MTA: dns; mx.example.org\n\n"
        "Action: failed\nFinal-Recipient: rfc822; a@example.org\nStatus: 5.1.1\n\n"
        "Action: delayed\nFinal-Recipient: rfc822; b@example.org\nStatus: 4.2.2\n"
    ),
    "Action first, no blank lines": (
        "Reporting-MTA: dns; mx.example.org\n"
        "Action: failed\nFinal-Recipient: rfc822; a@example.org\nStatus: 5.1.1\n"
        "Action: delayed\nFinal-Recipient: rfc822; b@example.org\nStatus: 4.2.2\n"
    ),
    "Action first, Original- after Final-Recipient": (
        "Reporting-MTA: dns; mx.example.org\n\n"
        "Action: failed\nFinal-Recipient: rfc822; a@example.org\nOriginal-Recipient: rfc822; a@example.org\n"
        "Diagnostic-Code: smtp; 550 5.1.1 no such user\nStatus: 5.1.1\n\n"
        "Action: delayed\nFinal-Recipient: rfc822; b@example.org\nOriginal-Recipient: rfc822; b@example.org\n"
        "Status: 4.2.2\n"
    ),
    "Original-Recipient first": (
        "Reporting-MTA: dns; mx.example.org\n"
        "Original-Recipient: rfc822; a@example.org\nFinal-Recipient: rfc822; a@example.org\n"
        "Action: failed\nStatus: 5.1.1\n"
        "Original-Recipient: rfc822; b@example.org\nFinal-Recipient: rfc822; b@example.org\n"
        "Action: delayed\nStatus: 4.2.2\n"
    ),
}


@pytest.mark.parametrize("text", BLOCKS.values(), ids=BLOCKS.keys())
def test_every_layout_gives_one_failure_per_recipient(text: str) -> None:
    report = dsn.scrape(text)
    assert report is not None
    assert [(f.final_recipient, f.action, f.status) for f in report.failures] == [
        ("a@example.org", "failed", "5.1.1"),
        ("b@example.org", "delayed", "4.2.2"),
    ]


def test_a_block_without_any_recipient_field_is_still_one_failure() -> None:
    # Sloppy MTAs: the report is still about the (tagged) envelope recipient.
    report = dsn.scrape("Reporting-MTA: dns; mx.example.org\n\nAction: failed\nStatus: 5.1.1\n")
    assert report is not None
    assert [(f.final_recipient, f.status) for f in report.failures] == [(None, "5.1.1")]
