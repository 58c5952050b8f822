"""MxServer benchmark: classified mail/s, SMTP mail/s, and a well-behaved client's answers under abuse.

1. **classifier**: every corpus message (tests/data/mx, placeholders expanded) through both
   phases -- analysis and verification against the records -- ``--rounds`` times in this
   process (pure CPU: MIME, DSN/ARF/SES/text-bounce parsing, bounce rules, HMACs);
2. **SMTP**: the real ``mxserver`` console script (its own process, classifier worker
   processes) with a private redis-server (AOF, ``appendfsync always``) holding the
   Transformer's records; ``--clients`` connections send ``--messages`` corpus messages (each
   connection reuses its session, as MTAs do).  Every accepted mail is durable before its 250:
   events in Redis, or an fsync'd file in the eml directory;
3. **under abuse**: while 50 idle connections (from 127.0.0.2-127.0.0.51) and 4 MIME-bomb
   senders (127.0.1.1-127.0.1.4, 70 KB of nested multiparts and 4000-part mails, back to back)
   are active, a well-behaved client from 127.0.0.1 sends ``--good`` genuine bounces, one
   session each.  Prints the p50/p99/max answer time of its commands (connect, EHLO, MAIL, RCPT,
   DATA) and how many 421s it got.  Goal: p99 < 200 ms and no 421.

Only loopback is used.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import redis

from common import binding
from common import bouncerules as rules
from devtools import mxcorpus, testing
from devtools.servers import RedisProcess, free_port, port_open, wait_until
from mxserver.analysis import Settings
from mxserver.classifier import Classifier, records_of

IDLE = [f"127.0.0.{i}" for i in range(2, 52)]
BOMBERS = [f"127.0.1.{i}" for i in range(1, 5)]
GOOD_UUID = "bench0good0uuid0001"
GOOD_RCPT = "reader@example.org"
STEPS = ("connect", "EHLO", "MAIL", "RCPT", "DATA")


def bench_classifier(rounds: int) -> None:
    settings = Settings(
        domains=frozenset({testing.RETURN_PATH_DOMAIN}),
        rules=rules.shipped(),
        own_hosts=frozenset({mxcorpus.OWN_MTA}),
        abuse_addresses=frozenset({mxcorpus.FBL_ADDRESS}),
        from_domains=frozenset({testing.SENDER_DOMAIN}),
    )
    classifier = Classifier(settings, mxcorpus.SIGNER)
    cases = [(c.rcpt, c.with_crlf(), records_of(c.records)) for c in mxcorpus.cases()]
    kinds: Counter[str] = Counter()
    start = time.perf_counter()
    for _ in range(rounds):
        for rcpts, raw, records in cases:
            kinds[classifier.classify(rcpts, raw, records=records, now=1).kind] += 1
    total = time.perf_counter() - start
    n = rounds * len(cases)
    size = sum(len(raw) for _, raw, _ in cases) / len(cases)
    print(f"classifier (one process, both phases): {n / total:,.0f} classified messages/s")
    print(f"  {len(cases)} corpus messages x {rounds} rounds, mean {size:,.0f} bytes")
    print("  outcomes per round: " + ", ".join(f"{k} {v // rounds}" for k, v in sorted(kinds.items())))


class Stack:
    """A private redis-server and the mxserver process."""

    def __init__(self, directory: Path) -> None:
        self.redis = RedisProcess(directory / "redis").start()
        self.ports = {"mxserver": free_port(), "mxserver-metrics": free_port()}
        customer = testing.customer_config(directory, redis_port=self.redis.port, ports=self.ports)
        self.eml = Path(customer["mxserver"]["eml-directory"])
        global_path, customer_path = testing.write_configs(directory / "configs", customer)
        argv = testing.service_command("mxserver", global_path, customer_path, "--log-level", "WARNING")
        self.proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
        wait_until(lambda: port_open("127.0.0.1", self.port), 60, what="mxserver")
        self.client = redis.Redis(port=self.redis.port)

    @property
    def port(self) -> int:
        return self.ports["mxserver"]

    def record(self, sent: dict[str, set[str]]) -> None:
        pipe = self.client.pipeline(transaction=True)
        for uuid, recipients in sent.items():
            binding.record_write(uuid, recipients, "bench", testing.SENDER_DOMAIN, 3600).write(pipe)
        pipe.execute()

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        self.client.close()
        self.redis.stop()


async def send_all(port: int, work: list[tuple[list[str], bytes]], clients: int) -> int:
    queue: asyncio.Queue[tuple[list[str], bytes]] = asyncio.Queue()
    for item in work:
        queue.put_nowait(item)
    refused = 0

    async def client() -> None:
        nonlocal refused
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, local_hostname="bench.test", timeout=60)
        await smtp.connect()
        try:
            while not queue.empty():
                rcpts, raw = queue.get_nowait()
                try:
                    await smtp.sendmail("", rcpts, raw)
                except aiosmtplib.SMTPRecipientsRefused:
                    refused += 1  # forged envelopes of the corpus: refused at RCPT
        finally:
            await smtp.quit()

    await asyncio.gather(*(client() for _ in range(clients)))
    return refused


def bench_smtp(stack: Stack, messages: int, clients: int) -> None:
    cases = mxcorpus.cases()
    for case in cases:
        stack.record(case.records)
    work = [(cases[i % len(cases)].rcpt, cases[i % len(cases)].with_crlf()) for i in range(messages)]
    start = time.perf_counter()
    refused = asyncio.run(send_all(stack.port, work, clients))
    total = time.perf_counter() - start
    events = stack.client.xlen("EVENT_QUEUE")
    kept = len(list(stack.eml.glob("*.eml")))
    print(
        f"SMTP (mxserver process, redis appendfsync always, {clients} connections): {messages / total:,.0f} messages/s"
    )
    print(f"  {messages} messages: {events} events in Redis, {kept} files kept, {refused} refused at RCPT")


def nested_bomb() -> bytes:
    head = b"".join(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i) for i in range(1300))
    return b"From: bomb@attacker.example\r\nSubject: hi\r\nMIME-Version: 1.0\r\n" + head


def wide_bomb() -> bytes:
    parts = b"".join(
        b"--b\r\nContent-Type: text/plain\r\n\r\nx%d@example.org 550 user unknown\r\n" % i for i in range(4000)
    )
    head = (
        b'From: MAILER-DAEMON@attacker.example\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n'
    )
    return head + b"\r\n" + parts + b"--b--\r\n"


def genuine_dsn(n: int) -> bytes:
    return (
        f"From: MAILER-DAEMON@mx.example.org\r\nSubject: Undelivered Mail\r\nMessage-ID: <good-{n}@mx.example.org>\r\n"
        'MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.org\r\n\r\n"
        f"Final-Recipient: rfc822; {GOOD_RCPT}\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n--b--\r\n"
    ).encode()


STEPS = ("connect", "EHLO", "MAIL", "RCPT", "DATA")


def attackers(port: int, ready: Any, stop: Any, sent: Any) -> None:
    """In a process of its own: hold the idle connections and run the bomb senders until ``stop``."""

    async def run() -> None:
        idle: list[asyncio.StreamWriter] = []
        for source in IDLE:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
            await reader.readline()  # the 220 banner: admitted
            idle.append(writer)
        payloads = [nested_bomb(), wide_bomb()]

        async def bomber(source: str) -> None:
            n = 0
            while not stop.is_set():
                smtp = aiosmtplib.SMTP(
                    hostname="127.0.0.1", port=port, local_hostname="bomb.test", source_address=(source, 0), timeout=60
                )
                await smtp.connect()
                await smtp.sendmail("", [f"postmaster@{testing.RETURN_PATH_DOMAIN}"], payloads[n % 2])
                n += 1
                with sent.get_lock():
                    sent.value += 1
                await smtp.quit()

        tasks = [asyncio.create_task(bomber(source)) for source in BOMBERS]
        ready.set()
        await asyncio.gather(*tasks)
        for writer in idle:
            writer.close()

    asyncio.run(run())


async def abuse(port: int, good: int) -> tuple[list[list[float]], int]:
    """The well-behaved client's answer times per session and command, and its 421s."""
    answers: list[list[float]] = []
    refused = 0
    rcpt = mxcorpus.SIGNER.return_path(GOOD_UUID, GOOD_RCPT, testing.RETURN_PATH_DOMAIN)
    for n in range(good):
        try:
            answers.append(await good_session(port, rcpt, genuine_dsn(n)))
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code != 421:
                raise
            refused += 1
    return answers, refused


async def good_session(port: int, rcpt: str, raw: bytes) -> list[float]:
    """One well-behaved session; the answer time of each command (connect, EHLO, MAIL, RCPT, DATA)."""
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, local_hostname="good.test", timeout=60)
    times: list[float] = []
    steps: tuple[Callable[[], Awaitable[object]], ...] = (
        smtp.connect,
        smtp.ehlo,
        lambda: smtp.mail(""),
        lambda: smtp.rcpt(rcpt),
        lambda: smtp.data(raw),
    )
    try:
        for step in steps:
            t0 = time.perf_counter()
            await step()
            times.append(time.perf_counter() - t0)
        await smtp.quit()
    finally:
        smtp.close()
    return times


def bench_abuse(stack: Stack, good: int) -> None:
    stack.record({GOOD_UUID: {GOOD_RCPT}})
    before = stack.client.xlen("EVENT_QUEUE")
    context = multiprocessing.get_context("spawn")
    ready, stop, sent = context.Event(), context.Event(), context.Value("i", 0)
    process = context.Process(target=attackers, args=(stack.port, ready, stop, sent), name="attackers")
    process.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("the attackers did not start")
        time.sleep(1.0)  # let the bombers get going before measuring
        sessions, refused = asyncio.run(abuse(stack.port, good))
    finally:
        stop.set()
        process.join(120)
    bombs, idle = sent.value, len(IDLE)
    answers = sorted(t for session in sessions for t in session)
    p50 = answers[len(answers) // 2] * 1000
    p99 = answers[min(len(answers) - 1, int(len(answers) * 0.99))] * 1000
    events = stack.client.xlen("EVENT_QUEUE") - before
    print(
        f"under abuse ({idle} idle connections, {len(BOMBERS)} MIME-bomb senders, {bombs} bombs sent): "
        f"well-behaved client p99 {p99:.1f} ms"
    )
    worst = answers[-1] * 1000
    print(
        f"  {good} sessions, {len(answers)} answers: p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {worst:.1f} ms; "
        f"421s {refused}; {events} events"
    )
    per_step = []
    for index, step in enumerate(STEPS):
        times = sorted(s[index] for s in sessions if len(s) > index)
        per_step.append(f"{step} {times[len(times) // 2] * 1000:.0f}/{times[int(len(times) * 0.99)] * 1000:.0f}")
    print("  p50/p99 ms by command: " + ", ".join(per_step))
    print(f"  goal p99 < 200 ms and no 421: {'met' if p99 < 200 and refused == 0 else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="classifier passes over the corpus")
    parser.add_argument("--messages", type=int, default=2000, help="messages sent through SMTP")
    parser.add_argument("--clients", type=int, default=8, help="concurrent SMTP connections")
    parser.add_argument("--good", type=int, default=100, help="sessions of the well-behaved client under abuse")
    args = parser.parse_args()
    bench_classifier(args.rounds)
    with tempfile.TemporaryDirectory(prefix="bench-mx-") as tmp:
        stack = Stack(Path(tmp))
        try:
            bench_smtp(stack, args.messages, args.clients)
            bench_abuse(stack, args.good)
        finally:
            stack.close()


if __name__ == "__main__":
    main()
