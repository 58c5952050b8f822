"""Transformer benchmark: DKIM signing next to raw OpenSSL, full transform, queue to queue.

One process = one core.  Prints, for 10 KB messages and an RSA-2048 key:

* raw OpenSSL RSA-2048 signatures/s (``openssl speed -seconds 3 rsa2048``) and raw
  ``cryptography`` signatures/s over the same 10 KB (what the signer builds on);
* signed messages/s through :class:`transformer.signer.DkimSigner` (canonicalise, hash, sign,
  fold) and its ratio to raw OpenSSL (goal >= 0.5x and >= 600 msg/s per core);
* full transforms/s (parse, header edits, beacon into a quoted-printable HTML part, sign);
* per-recipient copies: messages/s and signed copies/s for messages of 1, 5 and 20 recipients
  (one copy per recipient, each with its own tags and signatures), and the Redis memory of the
  record of who a message went to (``IB:sent:<uuid>``), in bytes per recipient;
* the cost of the wire form: full transforms/s of a 10 KB 8-bit UTF-8 text message (re-encoded
  to quoted-printable before signing) next to the same size in 7-bit (kept byte for byte),
  alternating three rounds each and printing the medians;
* queue to queue through a private redis-server: P1 -> worker loop -> INCOMING-TO-POSTFIX
  (``appendfsync always``, the production default).
"""

from __future__ import annotations

import argparse
import functools
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from prometheus_client import CollectorRegistry

from common import binding, keys
from common.addressing import AddressSigner
from common.config.transformer import FeedbackId
from common.dkimkeys import load_private_key
from common.lifecycle import Stopper
from common.payloads import SubmittedMail
from common.queue import Consumer, Queues, QueueSettings
from common.worker import Worker
from devtools import testing
from devtools.servers import RedisProcess, wait_until
from transformer.handler import TransformHandler
from transformer.message import RawMessage
from transformer.metrics import TransformerMetrics
from transformer.settings import DomainProfile, Settings
from transformer.signer import DkimSigner, Signature
from transformer.transform import MessageTransformer

SIZE = 10_240


def message(uuid: str, size: int = SIZE, html: bool = True) -> bytes:
    """A realistic message of about ``size`` bytes (multipart/alternative with QP HTML)."""
    head = (
        "From: Example Shop <news@example.test>\r\nTo: Alice Example <alice@dest.test>\r\n"
        "Subject: =?utf-8?q?Votre_r=C3=A9capitulatif_hebdomadaire?=\r\n"
        f"X-Uuid: {uuid}\r\nX-Stream-Id: weekly-2024-17\r\nX-Priority: 1\r\nMIME-Version: 1.0\r\n"
    )
    if not html:
        line = "The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
        body = line * ((size - len(head)) // len(line) + 1)
        return (head + "Content-Type: text/plain; charset=us-ascii\r\n\r\n" + body).encode()[:size] + b"\r\n"
    text_line = "Bonjour Alice, voici les nouveaut=C3=A9s de la semaine dans votre boutique.\r\n"
    html_line = '<tr><td style=3D"padding:4px">Article =C3=A0 d=C3=A9couvrir</td></tr>\r\n'
    parts = (
        head + 'Content-Type: multipart/alternative; boundary="b1"\r\n\r\n'
        "--b1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
        + text_line
        * 40
        + "--b1\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
        "<html><body><table>\r\n"
    )
    rows = max((size - len(parts) - 40) // len(html_line), 1)
    return (parts + html_line * rows + "</table></body></html>\r\n--b1--\r\n").encode()


def message_8bit(uuid: str, size: int = SIZE, eight_bit: bool = True) -> bytes:
    """About ``size`` bytes of text/plain: UTF-8 sent as 8bit, or the same text in plain ASCII."""
    head = (
        "From: Example Shop <news@example.test>\r\nTo: Alice Example <alice@dest.test>\r\n"
        f"Subject: weekly summary\r\nX-Uuid: {uuid}\r\nMIME-Version: 1.0\r\n"
    )
    if eight_bit:
        head += "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        line = "Bonjour Alice, voici les nouveautés de la semaine : crème brûlée à découvrir.\r\n"
    else:
        head += "Content-Type: text/plain; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
        line = "Hello Alice, here is what is new this week: a creme brulee to discover.\r\n"
    data = head.encode()
    while len(data) < size:
        data += line.encode()
    return data


def openssl_speed() -> float | None:
    if shutil.which("openssl") is None:
        return None
    proc = subprocess.run(
        ["openssl", "speed", "-seconds", "3", "rsa2048"], capture_output=True, text=True, check=False, timeout=120
    )
    match = re.search(r"rsa 2048 bits\s+\S+\s+\S+\s+([\d.]+)", proc.stdout)
    return float(match.group(1)) if match else None


def rate(fn: Callable[[], object], n: int, seconds: float) -> float:
    """Calls per second of ``fn``, over at most ``n`` calls or ``seconds``."""
    fn()  # warm-up
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while done < n and time.perf_counter() < deadline:
        fn()
        done += 1
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000, help="per phase (each phase also stops after 10 s)")
    parser.add_argument("--queue-messages", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--fsync", choices=["always", "everysec"], default="always")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-transformer-") as tmp:
        key_path = Path(tmp) / "dkim.pem"
        key_path.write_bytes(testing.rsa_pem(2048))
        key = load_private_key(key_path, "rsa")
        assert isinstance(key, rsa.RSAPrivateKey)
        raw_plain, raw_html = message("bench1", html=False), message("bench1")
        print(
            "transformer benchmark: one process (one core), RSA-2048, "
            f"messages of {len(raw_plain)} / {len(raw_html)} bytes"
        )

        openssl = openssl_speed()
        crypto = rate(lambda: key.sign(raw_plain, padding.PKCS1v15(), hashes.SHA256()), args.messages, args.seconds)
        signer = DkimSigner([Signature("example.test", "mailer", key)], clock=time.time)
        parsed = RawMessage.parse(raw_plain)
        signed = rate(lambda: signer.sign(RawMessage(list(parsed.fields), parsed.body)), args.messages, args.seconds)
        reference = openssl or crypto
        print(f"  raw OpenSSL RSA-2048 (openssl speed)     {openssl or float('nan'):10,.0f} sign/s")
        print(f"  raw cryptography RSA-2048 over 10 KB     {crypto:10,.0f} sign/s")
        print(
            f"  DkimSigner.sign, 10 KB message           {signed:10,.0f} msg/s   "
            f"ratio {signed / reference:.2f}x raw OpenSSL "
            f"({'meets' if signed >= 0.5 * reference and signed >= 600 else 'below'} the >= 0.5x and >= 600/s goal)"
        )

        transformer = _transformer(key)
        for name, raw in (("text/plain", raw_plain), ("multipart, QP HTML + beacon", raw_html)):
            mail = SubmittedMail(raw, "bench1", 1, "smtp", time.time())
            full = rate(functools.partial(transformer.transform, mail), args.messages, args.seconds)
            print(f"  full transform ({name:<27}) {full:8,.0f} msg/s")

        for n in (1, 5, 20):
            mail = SubmittedMail(with_recipients(raw_html, n), "bench1", 1, "smtp", time.time())
            per_message = rate(functools.partial(transformer.transform, mail), args.messages, args.seconds)
            print(f"  {n:2d} recipient(s): {per_message:8,.0f} msg/s = {per_message * n:8,.0f} signed copies/s")
        seven, eight = _reencoding_cost(transformer, args.messages, min(args.seconds, 3.0))
        print(f"  full transform, 10 KB 7-bit text (kept byte for byte)    {seven:8,.0f} msg/s")
        print(
            f"  full transform, 10 KB 8-bit UTF-8 (re-encoded to QP)     {eight:8,.0f} msg/s   "
            f"({eight / seven:.2f}x the 7-bit rate: the cost of re-encoding)"
        )

        server = RedisProcess(Path(tmp) / "redis", appendfsync=args.fsync).start()
        try:
            for n in (1, 5, 20):
                cost = _record_bytes(server.port, n)
                print(f"  record of who was sent to, {n:2d} recipient(s): {cost:6.1f} bytes per recipient")
            q2q = _queue_to_queue(server.port, transformer, raw_html, args.queue_messages)
        finally:
            server.stop()
        print(f"  queue to queue (P1 -> INCOMING-TO-POSTFIX, appendfsync {args.fsync}) {q2q:8,.0f} msg/s")


def with_recipients(raw: bytes, n: int) -> bytes:
    """``raw`` sent to ``n`` recipients (To: the first, Cc: the others)."""
    cc = ", ".join(f"Reader {i} <reader{i}@dest{i % 7}.test>" for i in range(1, n))
    return raw.replace(b"\r\nTo: Alice", (f"\r\nCc: {cc}" if cc else "").encode() + b"\r\nTo: Alice", 1)


def _record_bytes(port: int, n: int, messages: int = 5000) -> float:
    """Redis memory per recipient of the records of ``messages`` messages of ``n`` recipients."""
    client = redis.Redis(port=port)
    client.flushall()
    before = int(client.info("memory")["used_memory"])
    for first in range(0, messages, 500):
        pipe = client.pipeline(transaction=False)
        for i in range(first, min(first + 500, messages)):
            rcpts = [f"reader{j}.{i}@dest{j % 7}.example.com" for j in range(n)]
            binding.record_write(f"u{i:012d}", rcpts, "weekly-2024-17", "example.test", 30 * 86400).write(pipe)
        pipe.execute()
    used = int(client.info("memory")["used_memory"]) - before
    client.flushall()
    return used / (messages * n)


def _reencoding_cost(transformer: MessageTransformer, n: int, seconds: float) -> tuple[float, float]:
    """Median full-transform rates (7-bit, 8-bit) over three alternating rounds (the VM's speed drifts)."""
    mails = {
        eight_bit: SubmittedMail(message_8bit("bench2", eight_bit=eight_bit), "bench2", 1, "smtp", time.time())
        for eight_bit in (False, True)
    }
    assert transformer.transform(mails[True]).wire_form.body_parts == 1, "the 8-bit message must be re-encoded"
    assert transformer.transform(mails[False]).wire_form.body_parts == 0
    rounds: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(3):
        for eight_bit, mail in mails.items():
            rounds[eight_bit].append(rate(functools.partial(transformer.transform, mail), n, seconds))
    return sorted(rounds[False])[1], sorted(rounds[True])[1]


def _transformer(key: rsa.RSAPrivateKey) -> MessageTransformer:
    signer = DkimSigner([Signature("example.test", "mailer", key)], clock=time.time)
    profile = DomainProfile(
        domain="example.test",
        return_path_domain="bounces.example.test",
        signer=signer,
        beacon_url="https://t.example.test/open/{{stream-id}}/{{uuid}}.gif",
        unsubscribe_url="https://mail.example.test/unsubscribe/{{token}}",
    )
    settings = Settings(
        profiles={"example.test": profile},
        x_mailer="Inboxbooster-Mailer",
        feedback=FeedbackId(campaign_id="c", mail_type="newsletter", sender_id="bench"),
        inject=(),
    )
    return MessageTransformer(settings, AddressSigner(b"bench-secret"))


def _queue_to_queue(port: int, transformer: MessageTransformer, raw: bytes, n: int) -> float:
    client = redis.Redis(port=port)
    queues = Queues(client, QueueSettings(max_length=0, batch_size=64))
    p0, p1, out = "IB-MAIL-QUEUE-P0", "IB-MAIL-QUEUE-P1", "INCOMING-TO-POSTFIX"
    for first in range(0, n, 500):
        batch = [
            SubmittedMail(raw, f"q{i}", 1, "smtp", time.time()).to_fields() for i in range(first, min(first + 500, n))
        ]
        queues.enqueue_many(p1, batch)
    handler = TransformHandler(
        transformer,
        primary_queue=p0,
        outgoing_queue=out,
        event_queue="EVENT_QUEUE",
        metrics=TransformerMetrics(CollectorRegistry()),
    )
    consumer = Consumer(queues, [p0, p1], keys.GROUP_TRANSFORMER, "bench-0", block_ms=100)
    stopper = Stopper()
    worker = Worker(consumer, handler, stopper)
    thread = threading.Thread(target=worker.run, daemon=True)
    start = time.perf_counter()
    thread.start()
    wait_until(lambda: client.xlen(out) >= n, timeout_s=300, interval_s=0.05, what=f"{n} hand-offs")
    elapsed = time.perf_counter() - start
    stopper.stop()
    thread.join(timeout=10)
    return n / elapsed


if __name__ == "__main__":
    main()
