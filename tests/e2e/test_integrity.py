"""Signed mail that survives every hop (issue 15), through the running pipeline.

Every shape of the table below is submitted through both doors (Receiver over SMTP, HttpReceiver
over HTTP) to a real stack, twice: once with "the internet" advertising 8BITMIME and SMTPUTF8,
once with a receiver that advertises neither (the sink's 7-bit port, which refuses 8-bit data
and both MAIL parameters).  At the sink every platform signature must verify in two
independent implementations per algorithm -- OpenDKIM (``opendkim -t`` with ``TestPublicKeys``,
no DNS) and Perl Mail::DKIM for rsa-sha256, OpenDKIM and dkimpy for ed25519-sha256 (Debian's
Mail::DKIM has no ed25519) -- and every part must decode to what was submitted.  Shapes that
must be refused are refused by both doors, before 250/200, with the same rule, code and
enhanced status.

One stack per sink mode, shared by every shape: all shapes are submitted first, then the sink
is polled with a deadline.
"""

from __future__ import annotations

import base64
import email
import email.policy
import re
import shutil
import smtplib
import ssl
import subprocess
import uuid as uuidlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from email.utils import getaddresses
from pathlib import Path
from typing import Any

import dkim
import pytest
import requests

from common.addressing import message_id_uuid
from common.dkimkeys import load_private_key, public_key_record
from common.submission import normalise
from devtools import testing
from devtools.servers import free_port, wait_until
from devtools.sink import Received
from devtools.stack import Stack, free_ports
from transformer.customersig import signature_tags
from transformer.wire import ascii_domain, decode_words

pytestmark = [pytest.mark.e2e, pytest.mark.postfix, pytest.mark.redis, pytest.mark.slow]

MODES = ("8bitmime", "7bit")
ED_SELECTOR = "ed1"
CLIENT_SELECTOR = "client"
DOMAIN = testing.SENDER_DOMAIN
DEADLINE_S = 240.0

# -- the shapes ------------------------------------------------------------------------------

Build = Callable[[str], bytes]


@dataclass(frozen=True)
class Shape:
    """One kind of message, built for a uuid."""

    name: str
    build: Build
    recipients: int = 1
    refused: tuple[str, str] | None = None  # (rule, "<code> <enhanced status>") both doors answer
    smtputf8: bool = False  # needs SMTPUTF8: the 7-bit receiver cannot take it
    client_signature: str | None = None  # "kept" or "removed"


def _msg(
    uuid: str,
    body: bytes,
    *,
    subject: bytes = b"shape",
    to: bytes = b"rcpt@dest.test",
    sender: bytes = b"Shop <news@example.test>",
    headers: bytes = b"",
    eol: bytes = b"\r\n",
) -> bytes:
    head = [b"From: " + sender, b"To: " + to, b"Subject: " + subject, b"X-Uuid: " + uuid.encode()]
    head += [line for line in headers.split(b"\r\n") if line]
    return eol.join(head) + eol + eol + body


def _mime(content_type: bytes, cte: bytes | None = None) -> bytes:
    lines = b"MIME-Version: 1.0\r\nContent-Type: " + content_type
    return lines + (b"\r\nContent-Transfer-Encoding: " + cte if cte else b"")


def _multipart(boundary: bytes, parts: list[tuple[bytes, bytes]], preamble: bytes = b"") -> bytes:
    body = preamble
    for head, content in parts:
        body += b"--" + boundary + b"\r\n" + head + b"\r\n\r\n" + content + b"\r\n"
    return body + b"--" + boundary + b"--\r\n"


UTF8_TEXT = "Grüße aus Köln — naïve café, 東京, emoji 🎉.\r\nZweite Zeile: àéîõü ÆØÅ ß.\r\n".encode()
HTML = "<html><body><p>Grüße, <b>Zoë</b> — café ☕</p></body></html>".encode()
BINARY = bytes(range(256)).replace(b"\r", b"").replace(b"\n", b"") * 8
PDF_B64 = base64.b64encode(b"%PDF-1.4\n" + bytes(range(256)) * 12)


def _client_key() -> bytes:
    return testing.rsa_pem(2048, 1)


def _client_signed(raw: bytes, headers: list[bytes]) -> bytes:
    signature: bytes = dkim.sign(
        raw,
        CLIENT_SELECTOR.encode(),
        DOMAIN.encode(),
        _client_key(),
        include_headers=headers,
        canonicalize=(b"relaxed", b"relaxed"),
    )
    return signature + raw


def _shapes() -> list[Shape]:
    alt = _multipart(
        b"alt1",
        [
            (b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit", UTF8_TEXT),
            (b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit", HTML),
        ],
    )
    related = _multipart(
        b"rel1",
        [
            (b"Content-Type: text/html; charset=utf-8", HTML.replace(b"</p>", b'<img src="cid:logo@x"></p>')),
            (b"Content-Type: image/png\r\nContent-ID: <logo@x>\r\nContent-Transfer-Encoding: base64", PDF_B64),
        ],
    )
    mixed = _multipart(
        b"mix1",
        [
            (b'Content-Type: multipart/alternative; boundary="alt1"', alt),
            (b"Content-Type: application/octet-stream; name=data.bin\r\nContent-Transfer-Encoding: 8bit", BINARY),
            (
                b'Content-Type: application/pdf\r\nContent-Disposition: attachment; filename="report.pdf"\r\n'
                b"Content-Transfer-Encoding: base64",
                b"\r\n".join(PDF_B64[i : i + 76] for i in range(0, len(PDF_B64), 76)),
            ),
            (
                "Content-Type: text/csv; charset=utf-8\r\nContent-Disposition: attachment; "
                'filename="Übersicht März.csv"'.encode(),
                "name;city\r\nJörg;Köln\r\n".encode(),
            ),
        ],
        preamble=b"This is a multi-part message in MIME format.\r\n",
    )
    qp_long = b"Q" * 1200 + b" =C3=A9\r\nshort line\r\n"
    shapes = [
        Shape("plain-ascii", lambda u: _msg(u, b"Hello, plain 7-bit text.\r\n")),
        Shape(
            "utf8-8bit",
            lambda u: _msg(u, UTF8_TEXT, headers=_mime(b"text/plain; charset=utf-8", b"8bit")),
        ),
        Shape("utf8-without-mime-headers", lambda u: _msg(u, UTF8_TEXT)),
        Shape(
            "latin1-8bit",
            lambda u: _msg(
                u, b"Caf\xe9 cr\xe8me br\xfbl\xe9e.\r\n", headers=_mime(b"text/plain; charset=iso-8859-1", b"8bit")
            ),
        ),
        Shape(
            "quoted-printable",
            lambda u: _msg(
                u,
                b"Gr=C3=BC=C3=9Fe, soft =\r\nbreak.\r\n",
                headers=_mime(b"text/plain; charset=utf-8", b"quoted-printable"),
            ),
        ),
        Shape(
            "quoted-printable-long-lines",
            lambda u: _msg(u, qp_long, headers=_mime(b"text/plain; charset=utf-8", b"quoted-printable")),
        ),
        Shape(
            "base64",
            lambda u: _msg(
                u,
                base64.encodebytes(UTF8_TEXT).replace(b"\n", b"\r\n"),
                headers=_mime(b"text/plain; charset=utf-8", b"base64"),
            ),
        ),
        Shape(
            "base64-one-long-line",
            lambda u: _msg(u, PDF_B64 + b"\r\n", headers=_mime(b"application/pdf", b"base64")),
        ),
        Shape(
            "multipart-alternative",
            lambda u: _msg(u, alt, headers=_mime(b'multipart/alternative; boundary="alt1"')),
        ),
        Shape(
            "multipart-related",
            lambda u: _msg(u, related, headers=_mime(b'multipart/related; boundary="rel1"; type="text/html"')),
        ),
        Shape(
            "multipart-mixed-attachments",
            lambda u: _msg(u, mixed, headers=_mime(b'multipart/mixed; boundary="mix1"', b"8bit")),
        ),
        Shape(
            "rfc2047-headers",
            lambda u: _msg(
                u,
                b"encoded words already\r\n",
                subject=b"=?utf-8?q?R=C3=A9union_de_printemps?=",
                sender=b"=?utf-8?b?Q2Fmw6kgw5xuw69jb2Rl?= <news@example.test>",
                to=b"=?iso-8859-1?q?J=F6rg?= <joerg@dest.test>",
            ),
        ),
        Shape(
            "raw-utf8-headers",
            lambda u: _msg(
                u,
                b"raw UTF-8 in headers\r\n",
                subject="Café crème — offre spéciale ☕".encode(),
                sender="Café Ünïcode <news@example.test>".encode(),
                to="Zoë Ähnlich <zoe@dest.test>".encode(),
            ),
        ),
        Shape(
            "long-ascii-subject",
            lambda u: _msg(u, b"x\r\n", subject=b"A long subject " + b"word " * 60 + b"\r\n folded end"),
        ),
        Shape("long-utf8-subject", lambda u: _msg(u, b"x\r\n", subject=("Ünïcödé " * 40).encode())),
        Shape("body-line-999", lambda u: _msg(u, b"a" * 999 + b"\r\nnext\r\n")),
        Shape("body-line-5000", lambda u: _msg(u, b"b" * 5000 + b"\r\n")),
        Shape(
            "body-lines-998-999-4000-utf8",
            lambda u: _msg(
                u,
                b"c" * 998 + b"\r\n" + b"d" * 999 + b"\r\n" + "é".encode() * 2000 + b"\r\n",
                headers=_mime(b"text/plain; charset=utf-8", b"8bit"),
            ),
        ),
        Shape(
            "html-one-long-utf8-line",
            lambda u: _msg(u, HTML * 40 + b"\r\n", headers=_mime(b"text/html; charset=utf-8", b"8bit")),
        ),
        Shape("bare-lf-everywhere", lambda u: _msg(u, b"line one\nline two\n", eol=b"\n")),
        Shape("bare-lf-utf8", lambda u: _msg(u, "Zeile eins\nZeile zwei: ü\n".encode(), eol=b"\n")),
        Shape("bare-cr-in-body", lambda u: _msg(u, b"before\rafter\r\nend\r\n")),
        Shape("dot-lines", lambda u: _msg(u, b".\r\n..\r\n.leading dot\r\n...three\r\nend\r\n")),
        Shape("trailing-whitespace", lambda u: _msg(u, b"spaces   \r\ntab\t\r\nboth \t \r\n\r\n\r\n")),
        Shape(
            "trailing-whitespace-8bit",
            lambda u: _msg(u, "Grüße   \r\ntab\t\r\n".encode(), headers=_mime(b"text/plain; charset=utf-8", b"8bit")),
        ),
        Shape("empty-body", lambda u: _msg(u, b"")),
        Shape("no-final-newline", lambda u: _msg(u, b"no newline at the end")),
        Shape("from-line-in-body", lambda u: _msg(u, b"From here on\r\nFrom: not a header\r\n")),
        Shape(
            "to-and-cc-display-names-with-commas",
            lambda u: _msg(
                u,
                b"two recipients\r\n",
                to=b'"Doe, John" <john.doe@dest.test>',
                headers=b'Cc: "Roe, Jane (Sales)" <jane.roe@dest.test>',
            ),
            recipients=2,
        ),
        Shape(
            "utf8-display-names-with-commas",
            lambda u: _msg(
                u,
                b"two recipients, UTF-8 names\r\n",
                to='"Müller, Jörg" <mueller@dest.test>'.encode(),
                headers='Cc: "Ñúñez, Zoë" <nunez@dest.test>'.encode(),
            ),
            recipients=2,
        ),
        Shape("idn-domain", lambda u: _msg(u, b"IDN recipient domain\r\n", to="Jörg <joerg@bücher.test>".encode())),
        Shape(
            "reply-to-in-reply-to-references",
            lambda u: _msg(
                u,
                b"threaded\r\n",
                headers=b"Reply-To: support@example.test\r\nIn-Reply-To: <q1@client.test>\r\n"
                b"References: <q0@client.test> <q1@client.test>",
            ),
        ),
        Shape(
            "client-signed-kept",
            lambda u: _client_signed(
                _msg(u, b"signed by the customer\r\n", headers=b"Date: Tue, 14 Nov 2023 22:13:20 +0000"),
                [b"from", b"to", b"subject", b"date"],
            ),
            client_signature="kept",
        ),
        Shape(
            "client-signed-message-id",
            lambda u: _client_signed(
                _msg(u, b"signed over its Message-ID\r\n", headers=b"Message-ID: <c1@example.test>"),
                [b"from", b"to", b"subject", b"message-id"],
            ),
            client_signature="removed",
        ),
        Shape(
            "client-signed-8bit-body",
            lambda u: _client_signed(
                _msg(u, UTF8_TEXT, headers=_mime(b"text/plain; charset=utf-8", b"8bit")), [b"from", b"subject"]
            ),
            client_signature="removed",
        ),
        Shape(
            "smtputf8-local-part",
            lambda u: _msg(
                u,
                UTF8_TEXT,
                to="Zoë <zoë@dest.test>".encode(),
                headers=_mime(b"text/plain; charset=utf-8", b"8bit"),
            ),
            smtputf8=True,
        ),
        # Refused by both doors, before 250/200.
        Shape(
            "bare-cr-in-header",
            lambda u: _msg(u, b"x\r\n", headers=b"X-Stream-Id: camp\rX-Injected: yes"),
            refused=("bare-cr", "554 5.6.0"),
        ),
        Shape(
            "bare-cr-in-uuid",
            lambda u: _msg(u, b"x\r\n").replace(f"X-Uuid: {u}".encode(), f"X-Uuid: {u}\rx".encode()),
            refused=("bare-cr", "554 5.6.0"),
        ),
        Shape(
            "header-line-1200",
            lambda u: _msg(u, b"x\r\n", headers=b"X-Long: " + b"h" * 1200),
            refused=("header-line-too-long", "554 5.6.3"),
        ),
        Shape(
            "latin1-header",
            lambda u: _msg(u, b"x\r\n", subject=b"caf\xe9"),
            refused=("header-not-utf8", "554 5.6.0"),
        ),
        Shape(
            "control-character-in-stream-id",
            lambda u: _msg(u, b"x\r\n", headers=b"X-Stream-Id: camp\x07aign"),
            refused=("header-control-char", "554 5.6.0"),
        ),
        Shape(
            "uuid-missing",
            lambda u: _msg(u, b"x\r\n").replace(f"X-Uuid: {u}\r\n".encode(), b""),
            refused=("x-uuid-missing", "554 5.6.0"),
        ),
    ]
    return shapes


SHAPES = _shapes()
ACCEPTED = [s for s in SHAPES if s.refused is None]
assert len(ACCEPTED) >= 30 and len({s.name for s in SHAPES}) == len(SHAPES)


# -- one run per sink mode --------------------------------------------------------------------


@dataclass
class Submitted:
    """One shape through one door."""

    door: str
    uuid: str
    raw: bytes
    answer: tuple[int, str]  # SMTP (code, text) or HTTP (status, body)
    body: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    """A stack in one sink mode, with everything submitted to it."""

    mode: str
    stack: Stack
    records_file: Path
    opendkim_conf: Path
    records: dict[str, str]
    submitted: dict[str, list[Submitted]] = field(default_factory=dict)
    work: Path = Path()

    def copies(self, uuid: str) -> list[Received]:
        return [m for m in self.stack.sink.messages if _uuid_of(m.data) == uuid]

    def events(self, uuid: str, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.stack.webhook.events if e.get("uuid") == uuid and e["event"] == kind]


def _uuid_of(data: bytes) -> str | None:
    match = re.search(rb"^Message-ID:[ \t]*(.*)$", data, re.MULTILINE | re.IGNORECASE)
    return None if match is None else message_id_uuid(match.group(1).decode("ascii", "replace"))


@pytest.fixture(scope="module", params=MODES)
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    mode: str = request.param
    assert shutil.which("opendkim") or Path("/usr/sbin/opendkim").exists(), "opendkim is needed (apt: opendkim)"
    run_dir = tmp_path_factory.mktemp(f"integrity-{mode}")
    ports = free_ports()
    config_dir = run_dir / "configs"
    config_dir.mkdir(parents=True)
    ed_key = config_dir / "ed25519-example.test.key"
    ed_key.write_bytes(testing.ed25519_seed(1))
    no_lockout = {"auth-lockout": {"lockout-seconds": 0}}
    postfix: dict[str, Any] = {
        "string-replacer": {
            "main-cf": {"queue_run_delay": "2s", "minimal_backoff_time": "2s", "maximal_backoff_time": "4s"}
        }
    }
    if mode == "7bit":
        ports["sink-7bit"] = free_port()
        postfix["sandbox"] = {"enabled": True, "nexthop": f"[127.0.0.1]:{ports['sink-7bit']}"}
    override = {
        "receiver": no_lockout,
        "httpreceiver": no_lockout,
        "postfixlog": postfix,
        "transformer": {
            "domain-settings": [
                {
                    "domain": DOMAIN,
                    "dkim-private-key-file": str(config_dir / f"dkim-{DOMAIN}.pem"),
                    "selector": testing.SELECTOR,
                    "return-path-domain": testing.RETURN_PATH_DOMAIN,
                    "ed25519-private-key-file": str(ed_key),
                    "ed25519-selector": ED_SELECTOR,
                }
            ]
        },
    }
    stack = Stack(run_dir, ports=ports, customer_override=override)
    stack.start()
    try:
        records = {
            f"{testing.SELECTOR}._domainkey.{DOMAIN}": public_key_record(
                load_private_key(config_dir / f"dkim-{DOMAIN}.pem", "rsa")
            ),
            f"{ED_SELECTOR}._domainkey.{DOMAIN}": public_key_record(load_private_key(ed_key, "ed25519")),
            f"{CLIENT_SELECTOR}._domainkey.{DOMAIN}": public_key_record(_private(_client_key())),
        }
        work = run_dir / "verify"
        work.mkdir()
        records_file = work / "keys.txt"
        records_file.write_text("".join(f"{name} {value}\n" for name, value in records.items()))
        conf = work / "opendkim.conf"
        conf.write_text(f"Mode v\nTestPublicKeys {records_file}\nAlwaysAddARHeader yes\nAuthservID sink.test\n")
        result = Run(mode, stack, records_file, conf, records, work=work)
        _submit_all(result)
        _wait_for_outcomes(result)
        yield result
    finally:
        stack.stop()


def _private(pem: bytes) -> Any:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    return load_pem_private_key(pem, None)


def _submit_all(run: Run) -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the stack's self-signed certificate
    with smtplib.SMTP("127.0.0.1", run.stack.ports["receiver"], local_hostname="app.test", timeout=60) as client:
        client.starttls(context=context)
        client.login(testing.RECEIVER_USER, testing.RECEIVER_PASSWORD)
        for index, shape in enumerate(SHAPES):
            done: list[Submitted] = []
            for door in ("smtp", "http"):
                uuid = f"i{index:02d}{door[0]}{run.mode[0]}{uuidlib.uuid4().hex[:10]}"
                raw = shape.build(uuid)
                if door == "smtp":
                    client.mail("app@example.test")
                    client.rcpt("ignored@dest.test")
                    code, text = client.data(raw)
                    done.append(Submitted(door, uuid, raw, (code, text.decode("utf-8", "replace"))))
                else:
                    reply = requests.post(
                        f"http://127.0.0.1:{run.stack.ports['httpreceiver']}/v1/mail/send",
                        data=raw,
                        headers={"Content-Type": "message/rfc822"},
                        auth=(testing.RECEIVER_USER, testing.RECEIVER_PASSWORD),
                        timeout=60,
                    )
                    done.append(Submitted(door, uuid, raw, (reply.status_code, reply.text), reply.json()))
            run.submitted[shape.name] = done


def _expected_outcome(run: Run, shape: Shape, uuid: str) -> bool:
    if shape.smtputf8 and run.mode == "7bit":
        return bool(run.events(uuid, "bounce"))
    return len(run.copies(uuid)) >= shape.recipients


def _wait_for_outcomes(run: Run) -> None:
    pending = [
        (shape, sub.uuid) for shape in ACCEPTED for sub in run.submitted[shape.name] if sub.answer[0] in (200, 250)
    ]
    wait_until(
        lambda: all(_expected_outcome(run, shape, uuid) for shape, uuid in pending),
        timeout_s=DEADLINE_S,
        interval_s=0.5,
        what=f"every accepted shape delivered ({run.mode} receiver): "
        + ", ".join(f"{s.name}/{u}" for s, u in pending if not _expected_outcome(run, s, u))[:2000],
    )


# -- verification -------------------------------------------------------------------------------


def _opendkim(run: Run, data: bytes, name: str) -> dict[str, str]:
    """selector -> OpenDKIM's result (pass, fail, ...) for every signature."""
    path = run.work / f"{name}.eml"
    path.write_bytes(data)
    proc = subprocess.run(
        ["opendkim", "-x", str(run.opendkim_conf), "-t", str(path), "-vv"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    out = proc.stdout.decode("utf-8", "replace")
    assert "INSHEADER" in out, (proc.returncode, proc.stderr.decode("utf-8", "replace"))
    return {selector: result for result, selector in re.findall(r"dkim=(\w+)[^;]*?header\.s=([\w.-]+)", out)}


def _mail_dkim(run: Run, data: bytes) -> list[str]:
    proc = subprocess.run(
        ["perl", str(Path(__file__).parents[1] / "transformer" / "verify_dkim.pl"), str(run.records_file)],
        input=data,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode().splitlines()


def _dkimpy(run: Run, data: bytes) -> dict[str, bool]:
    """selector -> dkimpy's verdict for every signature."""
    table = {f"{name}.".encode(): value.encode() for name, value in run.records.items()}
    fields = [f for f in _fields(data) if f[0].lower() == b"dkim-signature"]
    verdicts: dict[str, bool] = {}
    for index, (_, raw_field) in enumerate(fields):
        selector = signature_tags(b"DKIM-Signature:" + raw_field)["s"]
        try:
            verdicts[selector] = bool(
                dkim.DKIM(data).verify(idx=index, dnsfunc=lambda name, timeout=5: table.get(name))
            )
        except dkim.DKIMException:
            verdicts[selector] = False
    return verdicts


def _fields(data: bytes) -> list[tuple[bytes, bytes]]:
    head = data.split(b"\r\n\r\n", 1)[0]
    out: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and out:
            out[-1] = (out[-1][0], out[-1][1] + b"\r\n" + line)
        else:
            name, _, value = line.partition(b":")
            out.append((name.strip(), value))
    return out


def _leaves(data: bytes) -> list[Message]:
    parsed = email.message_from_bytes(data, policy=email.policy.compat32)
    return [p for p in parsed.walk() if not p.is_multipart()]


def _header(data: bytes, name: str) -> str:
    values = [v for n, v in _fields(data) if n.lower() == name.lower().encode()]
    return decode_words(values[0].replace(b"\r\n", b"").decode("utf-8").strip()) if values else ""


def _addresses(data: bytes, name: str) -> list[tuple[str, str]]:
    """(display name, address) pairs; names decoded after the list is split (they may hold commas)."""
    values = [v for n, v in _fields(data) if n.lower() == name.lower().encode()]
    raw = values[0].replace(b"\r\n", b"").decode("utf-8").strip() if values else ""
    return [(decode_words(n), ascii_domain(a)) for n, a in getaddresses([raw]) if a]


def _filenames(data: bytes) -> list[str | None]:
    """File names of the leaf parts (the default policy reads raw UTF-8 and RFC 2231 alike)."""
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    return [p.get_filename() for p in parsed.walk() if not p.is_multipart()]


@pytest.mark.parametrize("shape", SHAPES, ids=[s.name for s in SHAPES])
def test_both_doors_give_the_same_answer(run: Run, shape: Shape) -> None:
    # Same acceptance, and for a refusal the same rule, SMTP code, enhanced status and text.
    smtp, http = run.submitted[shape.name]
    code, text = smtp.answer
    if shape.refused is None:
        assert code == 250, text
        assert http.answer[0] == 200, http.answer
        assert http.body == {"uuid": http.uuid, "queue": "IB-MAIL-QUEUE-P1"}
        return
    rule, status = shape.refused
    assert f"{code} {text}".startswith(status + " "), (code, text)
    assert http.answer[0] == 400, http.answer
    assert http.body["error"] == rule
    assert f"{http.body['smtp_code']} {http.body['enhanced_status']}" == status
    assert f"{code} {text}" == f"{http.body['smtp_code']} {http.body['enhanced_status']} {http.body['message']}"
    assert not run.copies(smtp.uuid) and not run.copies(http.uuid), "a refused message was delivered"


@pytest.mark.parametrize("shape", ACCEPTED, ids=[s.name for s in ACCEPTED])
def test_delivered_signed_and_unchanged(run: Run, shape: Shape) -> None:
    # Every copy at the sink: both platform signatures verify in two implementations each, the
    # customer's own signature is kept only when it still verifies, and every part decodes to
    # what was submitted.
    for sub in run.submitted[shape.name]:
        if shape.smtputf8 and run.mode == "7bit":
            [bounce] = run.events(sub.uuid, "bounce")
            assert bounce["classification"] == "smtputf8-unsupported", bounce
            assert bounce["suppress"] is False and bounce["type"] == "hard", bounce
            assert not run.copies(sub.uuid)
            continue
        copies = run.copies(sub.uuid)
        assert len(copies) == shape.recipients, [c.rcpt for c in copies]
        for n, copy in enumerate(copies):
            _check_copy(run, shape, sub, copy, f"{sub.uuid}-{n}")


def _check_copy(run: Run, shape: Shape, sub: Submitted, copy: Received, name: str) -> None:
    data = copy.data
    opendkim = _opendkim(run, data, name)
    perl = _mail_dkim(run, data)
    dkimpy = _dkimpy(run, data)
    assert opendkim.get(testing.SELECTOR) == "pass", opendkim
    assert f"rsa-sha256 {DOMAIN} {testing.SELECTOR} pass" in perl, perl
    assert opendkim.get(ED_SELECTOR) == "pass", opendkim
    assert dkimpy.get(ED_SELECTOR) is True and dkimpy.get(testing.SELECTOR) is True, dkimpy
    tags = next(
        signature_tags(b"DKIM-Signature:" + v)
        for n, v in _fields(data)
        if n.lower() == b"dkim-signature" and b"s=" + testing.SELECTOR.encode() in v.replace(b" ", b"")
    )
    signed = tags["h"].split(":")
    # The wire form: CRLF, short lines, 7-bit unless SMTPUTF8 (the 7-bit sink refuses 8-bit anyway).
    assert data.count(b"\n") == data.count(b"\r\n") == data.count(b"\r")
    assert max(map(len, data.split(b"\r\n"))) <= 998
    assert data.isascii() or shape.smtputf8
    assert copy.seven_bit == (run.mode == "7bit")
    if shape.smtputf8:
        assert "SMTPUTF8" in copy.mail_options
    for header in ("reply-to", "in-reply-to", "references", "message-id", "from", "to", "subject"):
        assert (header in signed) == bool(_header(data, header)), (header, signed)

    if shape.client_signature == "kept":
        assert opendkim.get(CLIENT_SELECTOR) == "pass", opendkim
        assert f"rsa-sha256 {DOMAIN} {CLIENT_SELECTOR} pass" in perl, perl
    else:
        assert CLIENT_SELECTOR not in opendkim, "the customer's signature should have been removed"

    # What the door queued: smtplib ends the data with CRLF when the message does not.
    submitted = normalise(sub.raw if sub.door == "http" or sub.raw.endswith(b"\r\n") else sub.raw + b"\r\n")
    assert _header(data, "Subject") == _header(submitted, "Subject")
    for name_ in ("From", "To", "Cc", "Reply-To"):
        assert _addresses(data, name_) == _addresses(submitted, name_), name_
    before, after = _leaves(submitted), _leaves(data)
    assert [p.get_content_type() for p in after] == [p.get_content_type() for p in before]
    for old, new in zip(before, after, strict=True):
        assert new.get_payload(decode=True) == old.get_payload(decode=True), old.get_content_type()
    assert _filenames(data) == _filenames(submitted)
