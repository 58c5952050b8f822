"""PostfixLog benchmark: Redis -> PostfixLog -> Postfix -> smtp-sink, next to smtp-source -> Postfix.

Both paths use the same private Postfix configuration (PostfixLog's defaults, sandbox relaying
every message to ``smtp-sink -u postfix 127.0.0.1:PORT 256``) on this machine:

* baseline: ``smtp-source -s 20 -m N -l SIZE`` injects N messages straight into Postfix;
* PostfixLog: N ``OutboundMail`` entries (SIZE bytes, one recipient) wait on
  ``INCOMING-TO-POSTFIX``; PostfixLog (a child process, as in production) starts, hands them to
  Postfix, follows the log and emits the ``delivered`` events.

Rates are messages/s from the start (smtp-source starts / PostfixLog's Postfix answers) until
Postfix has logged N ``status=sent`` (and, for PostfixLog, until N ``delivered`` events are on
``EVENT_QUEUE``).  Runs alternate, and the ratio
of each back-to-back pair is reported with its median.  Goal: PostfixLog reaches at least 0.9 of
the baseline.  Postfix, smtp-sink, Redis and PostfixLog share the machine's cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from common.payloads import OutboundMail
from common.queue import Queues, QueueSettings
from devtools import testing
from devtools.servers import RedisProcess, free_port, require, wait_until
from postfixlog.instance import PostfixInstance

INCOMING = "INCOMING-TO-POSTFIX"
EVENTS = "EVENT_QUEUE"
TIMERS = {"queue_run_delay": "5s", "minimal_backoff_time": "5s"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--size", type=int, default=10_240)
    parser.add_argument("--connections", type=int, default=8, help="PostfixLog's SMTP sessions to Postfix")
    parser.add_argument("--runs", type=int, default=3, help="alternating runs of each path")
    args = parser.parse_args()
    require("smtp-source")
    require("smtp-sink")
    print(
        f"postfixlog benchmark: {args.messages} messages of {args.size} bytes, one recipient each, "
        f"{os.cpu_count()} cores shared by Postfix, smtp-sink, Redis and the injector",
        flush=True,
    )
    base = Path(tempfile.mkdtemp(prefix="pf-bench-", dir="/tmp"))
    base.chmod(0o755)
    server = RedisProcess(base / "redis", appendfsync="always").start()
    sink_port = free_port()
    sink = subprocess.Popen(
        [require("smtp-sink"), "-u", "postfix", f"127.0.0.1:{sink_port}", "256"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: _port_open(sink_port), 10, what="smtp-sink")
        baseline: list[float] = []
        ours: list[tuple[float, float]] = []
        for run in range(args.runs):
            baseline.append(_baseline(base / f"baseline-{run}", sink_port, args))
            print(f"  run {run + 1}: baseline {baseline[-1]:,.0f} msg/s", flush=True)
            ours.append(_postfixlog(base / f"postfixlog-{run}", sink_port, server.port, args))
            print(f"  run {run + 1}: postfixlog {ours[-1][0]:,.0f} msg/s ({ours[-1][1]:,.0f} with events)", flush=True)
        ratios = [r / b for (r, _), b in zip(ours, baseline, strict=True)]
        print(f"  smtp-source -> Postfix -> smtp-sink            {_fmt(baseline)}  msg/s")
        print(f"  Redis -> PostfixLog -> Postfix -> smtp-sink    {_fmt([r for r, _ in ours])}  msg/s")
        print(f"    ... until every delivered event is emitted   {_fmt([e for _, e in ours])}  msg/s")
        print(f"  ratio per run (back-to-back pairs)             {' '.join(f'{r:8.2f}' for r in ratios)}")
        median = statistics.median(ratios)
        best = max(r for r, _ in ours) / max(baseline)
        print(
            f"  ratio: median {median:.2f}, best of each {best:.2f} "
            f"({'meets' if median >= 0.9 else 'below'} the 0.9 goal)"
        )
    finally:
        sink.send_signal(signal.SIGTERM)
        sink.wait(10)
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def _fmt(rates: list[float]) -> str:
    return " ".join(f"{r:8,.0f}" for r in rates)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _sent(instance: PostfixInstance) -> int:
    try:
        return instance.log_path.read_bytes().count(b"status=sent")
    except FileNotFoundError:
        return 0


def _baseline(directory: Path, sink_port: int, args: argparse.Namespace) -> float:
    messages: int = args.messages
    instance = PostfixInstance(directory, smtpd_port=free_port(), nexthop=f"[127.0.0.1]:{sink_port}", main_cf=TIMERS)
    instance.start()
    try:
        start = time.perf_counter()
        subprocess.run(
            [
                require("smtp-source"),
                "-s",
                "20",
                "-m",
                str(args.messages),
                "-l",
                str(args.size),
                "-f",
                "bounce-bench@bounces.example.test",
                "-t",
                "rcpt@dest.test",
                f"127.0.0.1:{instance.smtpd_port}",
            ],
            check=True,
            timeout=600,
        )
        wait_until(lambda: _sent(instance) >= args.messages, 600, interval_s=0.05, what="baseline deliveries")
        return messages / (time.perf_counter() - start)
    finally:
        instance.stop()


def _postfixlog(directory: Path, sink_port: int, redis_port: int, args: argparse.Namespace) -> tuple[float, float]:
    client = redis.Redis(port=redis_port)
    client.flushall()
    directory.mkdir(parents=True)
    port = free_port()
    customer: dict[str, Any] = testing.customer_config(directory, redis_port=redis_port)
    customer["postfixlog"].update(
        {
            "postfix": {"hostname": "127.0.0.1", "port": port, "connections": args.connections},
            "string-replacer": {
                "main-cf": {"myhostname": "mta.example.test", **TIMERS},
                "master-cf": {"smtpd-port": port},
            },
            "sandbox": {"enabled": True, "nexthop": f"[127.0.0.1]:{sink_port}"},
            "instance-directory": str(directory / "postfix"),
        }
    )
    global_ = testing.merge(testing.global_config(), {"reliable-queue": {"max-queue-length": 0}})
    gpath, cpath = testing.write_configs(directory / "configs", customer, global_)
    # The queue is filled first: what is measured is the hand-off from Redis, not the filling.
    queues = Queues(client, QueueSettings(max_length=0))
    line = b"x" * 76 + b"\r\n"
    body = line * max((args.size - 300) // len(line), 1)
    for i in range(0, args.messages, 500):
        queues.enqueue_many(INCOMING, [_mail(j, body) for j in range(i, min(i + 500, args.messages))])
    env = {**os.environ, "INBOXBOOSTER_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(
        testing.service_command("postfixlog", gpath, cpath),
        env=env,
    )
    instance = PostfixInstance(directory / "postfix", smtpd_port=port)
    try:
        # The clock starts when Postfix answers: PostfixLog starts consuming right after.
        wait_until(lambda: _port_open(port), 60, interval_s=0.005, what="PostfixLog's Postfix")
        cpu_before = _cpu_seconds(proc.pid)
        start = time.perf_counter()
        wait_until(lambda: _sent(instance) >= args.messages, 600, interval_s=0.05, what="PostfixLog deliveries")
        delivered_s = time.perf_counter() - start
        wait_until(lambda: client.xlen(EVENTS) >= args.messages, 120, interval_s=0.05, what="delivered events")
        events_s = time.perf_counter() - start
        cpu = _cpu_seconds(proc.pid) - cpu_before
        print(f"         PostfixLog process: {cpu:.1f} CPU-s, {100 * cpu / events_s:.0f}% of one core", flush=True)
        return args.messages / delivered_s, args.messages / events_s
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _mail(i: int, body: bytes) -> dict[str, bytes | str]:
    uuid = f"bench{i}"
    raw = (
        f"From: News <news@example.test>\r\nTo: rcpt{i}@dest.test\r\nSubject: bench {i}\r\n"
        f"Date: Wed, 25 Nov 2026 12:00:00 +0000\r\nMessage-ID: <{uuid}@bounces.example.test>\r\n\r\n"
    ).encode() + body
    mail = OutboundMail(
        raw=raw,
        uuid=uuid,
        mail_from=f"bounce-{uuid}-tag@bounces.example.test",
        recipients=(f"rcpt{i}@dest.test",),
        from_domain="example.test",
        stream_id="bench",
    )
    return mail.to_fields()


if __name__ == "__main__":
    main()
