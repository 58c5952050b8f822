"""Issue 13's forgeries, written as an attacker writes them, against a running MxServer + Redis.

The attacker received one genuine message (so knows one genuine return path, unsubscribe
address, one-click token and Message-ID: those of *their own* copy) and the uuid format.  No
report they write may produce an event about anybody else; every genuine report still produces
exactly one event, with the right uuid and recipient.
"""

from __future__ import annotations

import redis

from tests.security.conftest import (
    DOMAIN,
    FBL,
    POSTMASTER,
    Mx,
    events,
    message_id,
    record,
    return_path,
    token,
    unsub_address,
)

UUID = "9f1c2b3a4d5e6f708192"
OTHER_UUID = "0a1b2c3d4e5f60718293"
ATTACKER = "mallory@attacker.example"
VICTIM = "victim@example.net"
SENT = {UUID: [ATTACKER, VICTIM], OTHER_UUID: ["someone@example.org"]}


def arf(
    *,
    message_id_: str,
    rcpt_to: str | None = None,
    return_path_: str | None = None,
    list_unsubscribe: str | None = None,
    to: str = "undisclosed-recipients:;",
) -> bytes:
    """An RFC 5965 feedback report about a message with the given headers."""
    fields = "Feedback-Type: abuse\nUser-Agent: fbl.example/1.0\nVersion: 1\n"
    if rcpt_to is not None:
        fields += f"Original-Rcpt-To: <{rcpt_to}>\n"
    original = f"From: Shop <news@example.test>\nTo: {to}\nSubject: Spring offers\nMessage-ID: <{message_id_}>\n"
    if return_path_:
        original = f"Return-Path: <{return_path_}>\n" + original
    if list_unsubscribe:
        original += f"List-Unsubscribe: <https://mail.example.test/unsubscribe/{list_unsubscribe}>\n"
    return (
        "From: feedback@fbl.example\nTo: fbl@bounces.example.test\nSubject: Abuse report\n"
        f"Message-ID: <arf-{abs(hash((message_id_, rcpt_to, return_path_)))}@fbl.example>\nMIME-Version: 1.0\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="arf"\n\n'
        "--arf\nContent-Type: text/plain\n\nThis is an abuse report.\n\n"
        f"--arf\nContent-Type: message/feedback-report\n\n{fields}\n"
        f"--arf\nContent-Type: text/rfc822-headers\n\n{original}\n--arf--\n"
    ).encode()


def dsn(finals: list[str], *, inner_return_path: str = "", inner_message_id: str = "<x@elsewhere.example>") -> bytes:
    """An RFC 3464 report naming ``finals`` as failed recipients."""
    blocks = "\n".join(
        f"Final-Recipient: rfc822; {f}\nAction: failed\nStatus: 5.1.1\n"
        f"Diagnostic-Code: smtp; 550 5.1.1 <{f}>: user unknown\n"
        for f in finals
    )
    return (
        "From: MAILER-DAEMON@mx.example.net\nSubject: Undelivered Mail Returned to Sender\n"
        f"Message-ID: <dsn-{abs(hash((tuple(finals), inner_return_path, inner_message_id)))}@mx.example.net>\n"
        'MIME-Version: 1.0\nContent-Type: multipart/report; report-type=delivery-status; boundary="b"\n\n'
        "--b\nContent-Type: text/plain\n\nDelivery failed.\n\n"
        f"--b\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx.example.net\n\n{blocks}\n"
        "--b\nContent-Type: text/rfc822-headers\n\n"
        f"Return-Path: <{inner_return_path}>\nMessage-ID: {inner_message_id}\n\n"
        "--b--\n"
    ).encode()


def unsubscribe_mail(sender: str) -> bytes:
    return f"From: {sender}\nTo: someone\nSubject: unsubscribe\n\nPlease unsubscribe me.\n".encode()


def nothing_for(r: redis.Redis, mx: Mx, reply: tuple[int, bytes]) -> None:
    """The forged report was refused at RCPT or accepted and kept: no customer event."""
    code, text = reply
    assert code in (250, 550), (code, text)
    assert events(r) == []


# -- the forgeries of issue 13 --------------------------------------------------------------------


def test_arf_naming_any_message_id_on_our_domain_is_no_spam_report(mx: Mx, r: redis.Redis) -> None:
    record(r, SENT)
    before = mx.metric("mailer_mxserver_unverified_total", reason="no-tag")
    reply = mx.send([FBL], arf(message_id_=f"{UUID}@{DOMAIN}", rcpt_to=VICTIM, to=VICTIM))
    nothing_for(r, mx, reply)
    assert mx.metric("mailer_mxserver_unverified_total", reason="no-tag") == before + 1


def test_arf_variations(mx: Mx, r: redis.Redis) -> None:
    record(r, SENT)
    mine = message_id(UUID, ATTACKER).strip("<>")
    forged = mine[: mine.index(".") + 1] + "aaaaaaaaaa" + mine[mine.index(".") + 11 :]
    for report in (
        # Our Message-ID shape with a forged tag, naming the victim.
        arf(message_id_=forged, rcpt_to=VICTIM, to=VICTIM),
        # A Message-ID of another domain (nothing of ours in it).
        arf(message_id_=f"{UUID}.abcdefghij.abcdefghijklm@shop.example", rcpt_to=VICTIM),
        # The attacker's own genuine Message-ID, but naming the victim as the complainer.
        arf(message_id_=mine, rcpt_to=VICTIM, to=VICTIM),
        # The attacker's own genuine tags of one uuid next to a token of another uuid.
        arf(message_id_=mine, list_unsubscribe=token(OTHER_UUID, "someone@example.org")),
        # Upper-cased forged tag.
        arf(message_id_=forged.upper(), rcpt_to=VICTIM.upper()),
    ):
        nothing_for(r, mx, mx.send([FBL], report))


def test_dsn_to_a_genuine_bounce_address_naming_a_third_party_is_no_bounce(mx: Mx, r: redis.Redis) -> None:
    record(r, SENT)
    nothing_for(r, mx, mx.send([return_path(UUID, ATTACKER)], dsn([VICTIM])))


def test_dsn_variations(mx: Mx, r: redis.Redis) -> None:
    record(r, SENT)
    mine = return_path(UUID, ATTACKER)
    for rcpts, report in (
        # Several Final-Recipients, none of them the bound one.
        ([mine], dsn([VICTIM, "ceo@example.net", "cfo@example.net"])),
        # A genuine tag of another uuid inside the report: the tags disagree.
        ([mine], dsn([ATTACKER], inner_return_path=return_path(OTHER_UUID, "someone@example.org"))),
        # The attacker's own tag in the envelope and in the returned headers, naming the victim.
        ([mine], dsn([VICTIM], inner_return_path=mine)),
        # Sent to postmaster, attributed only by the attacker's tag, naming the victim.
        ([POSTMASTER], dsn([VICTIM], inner_return_path=mine)),
        # Message-ID of the right shape, other domain.
        ([POSTMASTER], dsn([VICTIM], inner_message_id=f"<{UUID}.abcdefghij.abcdefghijklm@shop.example>")),
    ):
        nothing_for(r, mx, mx.send(rcpts, report))


def test_a_forged_envelope_tag_is_not_saved_by_genuine_values_in_the_report(mx: Mx, r: redis.Redis) -> None:
    # The attacker's own tag pasted onto a uuid that has no record (RCPT cannot refuse it), with
    # the attacker's genuine return path quoted inside: a genuine MTA reports to the exact return
    # path, so a forged envelope tag makes the report unverified.
    record(r, SENT)
    mine = return_path(UUID, ATTACKER)
    tag = mine.split("-")[2].split("@")[0]
    unrecorded = "5f5f5f5f5f5f5f5f5f5f"
    before = mx.metric("mailer_mxserver_unverified_total", reason="bad-tag")
    nothing_for(r, mx, mx.send([f"bounce-{unrecorded}-{tag}@{DOMAIN}"], dsn([ATTACKER], inner_return_path=mine)))
    assert mx.metric("mailer_mxserver_unverified_total", reason="bad-tag") == before + 1


def test_a_forged_or_foreign_tag_is_refused_at_rcpt(mx: Mx, r: redis.Redis) -> None:
    record(r, SENT)
    mine = return_path(UUID, ATTACKER)
    tag = mine.split("-")[2].split("@")[0]
    # The attacker's tag pasted onto another uuid, the victim's recipient tag guessed, case changes.
    for address in (
        f"bounce-{OTHER_UUID}-{tag}@{DOMAIN}",
        f"bounce-{UUID}-aaaaaaaaaa@{DOMAIN}",
        f"BOUNCE-{UUID}-AAAAAAAAAA@{DOMAIN.upper()}",
        f"unsub-{UUID}-{tag}@{DOMAIN}",
    ):
        code, text = mx.send([address], dsn([VICTIM]))
        assert (code, text[:5]) == (550, b"5.7.1"), address
    assert events(r) == []


def test_unsubscribe_mail_from_the_victim_unsubscribes_only_the_bound_address(mx: Mx, r: redis.Redis) -> None:
    # Issue 13: "mail to a genuine unsub address with From: victim yields an unsubscribe for the
    # victim".  The address was issued for the attacker's own copy: whoever writes, the event is
    # about that copy's recipient -- never about the victim.
    record(r, SENT)
    assert mx.send([unsub_address(UUID, ATTACKER)], unsubscribe_mail(f"Victim <{VICTIM}>"))[0] == 250
    (event,) = events(r)
    assert (event["event"], event["uuid"], event["recipient"], event["reported_recipient"]) == (
        "unsubscribe",
        UUID,
        ATTACKER,
        VICTIM,
    )
    # An unsubscribe address of another uuid, made from the attacker's tag: refused.
    tag = unsub_address(UUID, ATTACKER).split("-")[2].split("@")[0]
    code, _ = mx.send([f"unsub-{OTHER_UUID}-{tag}@{DOMAIN}"], unsubscribe_mail(VICTIM))
    assert code == 550
    assert len(events(r)) == 1


# -- genuine reports: exactly one event each --------------------------------------------------------


def test_genuine_reports_give_exactly_one_event_each(mx: Mx, r: redis.Redis) -> None:
    record(r, SENT)
    victim_tag = return_path(UUID, VICTIM)
    sent = [
        # A DSN about the victim's copy, to the victim's return path (the genuine case).
        ([victim_tag], dsn([VICTIM]), ("bounce", VICTIM)),
        # Upper-cased genuine address (case changes do not break a genuine tag).
        ([victim_tag.upper()], dsn(["Victim@Example.NET"]), ("bounce", VICTIM)),
        # ARF attributed by the tagged Message-ID alone, recipient redacted (Microsoft, AOL style).
        ([FBL], arf(message_id_=message_id(UUID, VICTIM).strip("<>"), to="[REDACTED]"), ("spam-report", VICTIM)),
        # ARF attributed by the one-click token alone, naming the complainer.
        (
            [FBL],
            arf(message_id_="x@mail.example", rcpt_to=VICTIM, list_unsubscribe=token(UUID, VICTIM)),
            ("spam-report", VICTIM),
        ),
        # A mail unsubscribe.
        ([unsub_address(UUID, VICTIM)], unsubscribe_mail(VICTIM), ("unsubscribe", VICTIM)),
    ]
    for rcpts, report, (kind, recipient) in sent:
        before = len(events(r))
        assert mx.send(rcpts, report)[0] == 250
        new = events(r)[before:]
        assert [(e["event"], e["uuid"], e["recipient"]) for e in new] == [(kind, UUID, recipient)], new
        assert new[0]["stream_id"] == "campaign-7" and new[0]["verified"] is True
    # The same report delivered again (the sender lost our 250): the same event id, so the
    # customer drops the duplicate.
    assert mx.send([victim_tag], dsn([VICTIM]))[0] == 250
    assert events(r)[-1]["event_id"] == events(r)[0]["event_id"]
