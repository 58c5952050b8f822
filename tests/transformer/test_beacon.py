"""Beacon: every inline text/html part at any depth, in its own transfer encoding; nothing else changes."""

from __future__ import annotations

import base64
import binascii

import pytest

from transformer.beacon import beacon_url, image_tag, insert_beacon
from transformer.message import RawMessage

TAG = image_tag("https://t.test/o.gif")


def _run(raw: bytes):
    msg = RawMessage.parse(raw)
    return msg, insert_beacon(msg.fields, msg.body, TAG)


@pytest.mark.parametrize(
    ("template", "stream", "url"),
    [
        ("https://t/{{stream-id}}.gif", "a b/c", "https://t/a%20b%2Fc.gif"),
        ("https://t/{{ stream-id }}/{{streamid}}/{{ streamid }}", "s", "https://t/s/s/s"),
        ("https://t/{{uuid}}?s={{stream-id}}", None, "https://t/u1?s="),
    ],
)
def test_beacon_url_placeholders(template: str, stream: str | None, url: str) -> None:
    # A missing X-Stream-Id gives an empty value instead of disabling the beacon (original bug).
    assert beacon_url(template, uuid="u1", stream_id=stream) == url


def test_image_tag_escapes_the_url() -> None:
    assert image_tag('https://t/?a=1&b="2"') == (
        b'<img width="1" height="1" border="0" alt="" src="https://t/?a=1&amp;b=&quot;2&quot;">'
    )


def test_base64_part_is_reencoded_as_base64() -> None:
    html = b"<html><body>" + "é".encode() * 100 + b"</body></html>\r\n"
    encoded = base64.encodebytes(html).replace(b"\n", b"\r\n")
    raw = b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n" + encoded
    _, result = _run(raw)
    assert result.inserted == 1
    assert all(len(line) <= 76 for line in result.body.split(b"\r\n"))
    assert base64.b64decode(result.body) == html.replace(b"</body>", TAG + b"</body>")


def test_quoted_printable_part_is_reencoded_as_quoted_printable() -> None:
    html = ("<html><body><p>" + "Grüße " * 40 + "</p>\r\n</body></html>\r\n").encode()
    encoded = binascii.b2a_qp(html, istext=True)
    raw = b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n" + encoded
    _, result = _run(raw)
    assert result.inserted == 1
    assert all(len(line) <= 76 for line in result.body.split(b"\r\n"))
    assert b"\n" not in result.body.replace(b"\r\n", b"")
    assert binascii.a2b_qp(result.body) == html.replace(b"</body>", TAG + b"</body>")


def test_utf16_html_is_decoded_before_insertion() -> None:
    html = "<html><body>ünïcode</body></html>".encode("utf-16")
    raw = b"Content-Type: text/html; charset=utf-16\r\nContent-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(
        html
    ).replace(b"\n", b"\r\n")
    _, result = _run(raw)
    assert base64.b64decode(result.body).decode("utf-16") == "<html><body>ünïcode" + TAG.decode() + "</body></html>"


def test_only_the_html_part_changes_in_a_nested_tree() -> None:
    raw = (
        b'Content-Type: multipart/mixed; boundary="o"\r\n\r\npreamble\r\n--o\r\n'
        b"Content-Type: multipart/related; boundary=r\r\n\r\n--r\r\n"
        b"Content-Type: multipart/alternative; boundary=a\r\n\r\n--a\r\n"
        b"Content-Type: text/plain\r\n\r\n</body> in plain text stays\r\n--a\r\n"
        b"Content-Type: text/html\r\n\r\n<body>deep</body>\r\n--a--\r\n--r\r\n"
        b"Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n--r--\r\n"
        b"--o--  \r\nepilogue\r\n"
    )
    msg, result = _run(raw)
    assert result.inserted == 1
    assert result.body == msg.body.replace(b"<body>deep</body>", b"<body>deep" + TAG + b"</body>")


def test_attachments_and_unknown_encodings_are_left_alone() -> None:
    raw = (
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
        b"Content-Type: text/html\r\nContent-Disposition: attachment; filename=a.html\r\n\r\n<body></body>\r\n--b\r\n"
        b"Content-Type: text/html\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\nbegin 644\r\n--b\r\n"
        b"Content-Type: text/html\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not base64!!!\r\n--b--\r\n"
    )
    msg, result = _run(raw)
    assert result.inserted == 0
    assert result.body == msg.body
    assert len(result.warnings) == 2
    assert "x-uuencode" in result.warnings[0] and "base64" in result.warnings[1]


def test_multipart_without_boundary_is_reported() -> None:
    msg, result = _run(b"Content-Type: multipart/mixed\r\n\r\n<body></body>\r\n")
    assert result.body == msg.body
    assert result.warnings == ["multipart/mixed without a boundary; no beacon inside"]


def test_text_plain_message_is_untouched() -> None:
    msg, result = _run(b"Subject: x\r\n\r\n<html><body>plain</body></html>\r\n")
    assert (result.body, result.inserted) == (msg.body, 0)
