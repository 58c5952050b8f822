"""Message-IDs (AddressSigner.message_id): unique, never short, tagged for their recipient, parsed
back by MxServer; ids of the old ``<uuid@domain>`` form still yield their (unauthenticated) uuid."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from common.addressing import MAX_UUID_LENGTH, AddressSigner, message_id_uuid, parse_message_id

DOMAIN = "bounces.example.test"
SIGNER = AddressSigner(b"test-address-secret-of-32-bytes!")
_uuids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=MAX_UUID_LENGTH)


def test_format_is_uuid_tag_suffix_at_domain() -> None:
    value = SIGNER.message_id("a", "rcpt@dest.test", DOMAIN, now=1_700_000_000.0, nonce=b"\x00" * 4)
    tag = SIGNER.tag("msgid", "a", "rcpt@dest.test")
    assert re.fullmatch(rf"<a\.{tag}\.[a-z2-7]{{16}}@bounces\.example\.test>", value)


@given(_uuids)
def test_never_short_tagged_and_parsed_back(uuid: str) -> None:
    value = SIGNER.message_id(uuid, "Rcpt@Dest.test", DOMAIN)
    local = value[1:].split("@", 1)[0]
    assert len(local) >= 25  # SpamAssassin's MSGID_SHORT looks at short local parts
    found = parse_message_id(value)
    assert found is not None and (found.kind, found.uuid, found.domain) == ("msgid", uuid, DOMAIN)
    assert SIGNER.verify("msgid", uuid, found.tag, "rcpt@dest.test")
    assert not SIGNER.verify("msgid", uuid, found.tag, "other@dest.test")
    assert message_id_uuid(value, {DOMAIN}) == uuid
    assert message_id_uuid(value, {"other.test"}) is None


def test_unique_for_the_same_uuid_recipient_and_instant() -> None:
    values = {SIGNER.message_id("u1", "r@dest.test", DOMAIN, now=1_700_000_000.0) for _ in range(1000)}
    assert len(values) == 1000  # 32 random bits: a collision among 1000 has odds of about 1 in 8600


def test_parses_old_ids_references_lists_and_ignores_foreign_ones() -> None:
    assert message_id_uuid("<u7@bounces.example.test>", {DOMAIN}) == "u7"
    assert parse_message_id("<u7@bounces.example.test>") is None  # untagged: proves nothing
    refs = "<x@client.test> <U8.ABCDEFGHIJ.ABCDEFGHIJKLMNOP@Bounces.Example.Test>"
    assert message_id_uuid(refs, {DOMAIN}) == "u8"
    assert message_id_uuid("<not-ours@client.test>") is None
    assert message_id_uuid("<" + "a" * 47 + ".suffixsuffixs@bounces.example.test>") is None
    assert message_id_uuid("no id at all") is None
