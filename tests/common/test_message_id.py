"""Message-IDs (common.addressing.message_id / message_id_uuid): unique, never short, parsed
back to the uuid by MxServer; ids of the old ``<uuid@domain>`` form still parse."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from common.addressing import MAX_UUID_LENGTH, AddressSigner, message_id, message_id_uuid
from mxserver.attribution import Attributor

DOMAIN = "bounces.example.test"
_uuids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=MAX_UUID_LENGTH)


def test_format_is_uuid_dot_suffix_at_domain() -> None:
    value = message_id("a", DOMAIN, now=1_700_000_000.0, nonce=b"\x00" * 5)
    assert value == "<a.loyw3v28aaaaaaaa@bounces.example.test>"


@given(_uuids)
def test_never_short_and_parsed_back(uuid: str) -> None:
    value = message_id(uuid, DOMAIN)
    local = value[1:].split("@", 1)[0]
    assert re.fullmatch(rf"{uuid}\.[a-z0-9]{{16}}", local)
    assert len(local) >= 18  # SpamAssassin's MSGID_SHORT looks at short local parts
    assert message_id_uuid(value) == uuid
    assert message_id_uuid(value, {DOMAIN}) == uuid
    assert message_id_uuid(value, {"other.test"}) is None


def test_unique_for_the_same_uuid_and_instant() -> None:
    values = {message_id("u1", DOMAIN, now=1_700_000_000.0) for _ in range(1000)}
    assert len(values) == 1000


def test_time_orders_the_suffix() -> None:
    early = message_id("u", DOMAIN, now=1_700_000_000.0, nonce=b"\xff" * 5)
    late = message_id("u", DOMAIN, now=1_700_000_000.001, nonce=b"\x00" * 5)
    assert early[3:11] < late[3:11]


def test_parses_old_ids_references_lists_and_ignores_foreign_ones() -> None:
    assert message_id_uuid("<u7@bounces.example.test>", {DOMAIN}) == "u7"
    refs = "<x@client.test> <U8.LOYW3V28AAAAAAAA@Bounces.Example.Test>"
    assert message_id_uuid(refs, {DOMAIN}) == "u8"
    assert message_id_uuid("<not-ours@client.test>") is None
    assert message_id_uuid("<" + "a" * 47 + ".suffixsuffixs@bounces.example.test>") is None
    assert message_id_uuid("no id at all") is None


def test_mxserver_finds_the_uuid_in_a_quoted_message_id() -> None:
    import email

    original = email.message_from_string(f"Message-ID: {message_id('abc9', DOMAIN)}\r\n\r\n")
    found = Attributor(AddressSigner(b"s"), frozenset({DOMAIN})).from_message_id(original)
    assert found is not None and (found.uuid, found.source, found.verified) == ("abc9", "message-id", False)
