"""Provider shaping benchmark: per-provider delivery and 421 answers, without and with automatic back-off.

Three providers (alpha, beta, gamma), each with two recipient domains whose MX records a
loopback DNS server answers with a loopback address of its own, where the provider's sink
listens on port 25.  alpha's sink answers ``421 4.7.0`` beyond ``--throttle`` recipients per
window, as a provider that rate-limits a new sender; beta and gamma accept everything.  One
PostfixLog (with its Postfix: real MX lookups through its own resolv.conf) delivers
``--messages`` per provider, all queued at once, twice: with the back-off switched off (Postfix
alone retries what was deferred, every 1-2 s here) and on.  Printed: delivered msg/s per provider
(from the queueing to its last ``delivered`` event), the 421 answers alpha gave, pauses, and
the entries that waited in Redis (held at injection, or withdrawn from Postfix' deferred queue).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import redis as redislib

from common.config import load_config
from common.events import decode_event
from common.payloads import OutboundMail
from common.service import Context
from devtools import testing
from devtools.dnsserver import DnsServer
from devtools.servers import RedisProcess, free_port, wait_until
from devtools.sink import Sink
from postfixlog.service import PostfixLogService

PROVIDERS = ("alpha", "beta", "gamma")
THROTTLE = "421 4.7.0 <{addr}>: too many messages from your IP, slow down"
#: Short retry timers (a deferred message is tried again after 3-4 s); below 3 s, qmgr can rescan a
#: message the smtp process that deferred it still holds ("skipped, still being delivered").
FAST_TIMERS = {"queue_run_delay": "1s", "minimal_backoff_time": "3s", "maximal_backoff_time": "4s"}


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def addresses() -> dict[str, str]:
    base = f"127.20.{os.getpid() % 250 + 1}"
    return {p: f"{base}.{i + 1}" for i, p in enumerate(PROVIDERS)}


def dns_records(where: dict[str, str]) -> dict[tuple[str, str], list[str]]:
    records: dict[tuple[str, str], list[str]] = {}
    for provider, address in where.items():
        for domain in (f"{provider}.test", f"hosted-by-{provider}.test"):
            records[(domain, "MX")] = [f"10 mx.{provider}-mail.test"]
        records[(f"mx.{provider}-mail.test", "A")] = [address]
    return records


def mail(uuid: str, rcpt: str, size: int) -> OutboundMail:
    body = "The quick brown fox jumps over the lazy dog.\r\n" * max(1, size // 46)
    raw = (
        f"From: News <news@{testing.SENDER_DOMAIN}>\r\nTo: {rcpt}\r\nSubject: shaping {uuid}\r\n"
        f"Date: Wed, 25 Nov 2026 12:00:00 +0000\r\nMessage-ID: <{uuid}@{testing.RETURN_PATH_DOMAIN}>\r\n"
        f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n{body}"
    ).encode()
    return OutboundMail(
        raw=raw,
        uuid=uuid,
        mail_from=f"bounce-{uuid}-aaaaaaaaaa@{testing.RETURN_PATH_DOMAIN}",
        recipients=(rcpt,),
        from_domain=testing.SENDER_DOMAIN,
    )


def run(work: Path, backoff: bool, args: argparse.Namespace, redis_port: int, dns: DnsServer) -> dict[str, Any]:
    client: Any = redislib.Redis(host="127.0.0.1", port=redis_port)
    client.flushall()
    where = addresses()
    count, window = args.throttle.split("/")
    sinks = {
        p: Sink(a, 25, throttle=(int(count), float(window.rstrip("s")), THROTTLE) if p == "alpha" else None).start()
        for p, a in where.items()
    }
    port = free_port()
    directory = work / ("on" if backoff else "off")
    directory.mkdir()
    directory.chmod(0o755)
    customer = testing.merge(
        testing.customer_config(directory, redis_port=redis_port),
        {
            "postfixlog": {
                "postfix": {"port": port},
                "string-replacer": {"main-cf": FAST_TIMERS, "master-cf": {"smtpd-port": port}},
                "sandbox": {"enabled": False},
                "instance-directory": str(directory / "pf"),
                "shaping": {
                    "dns-servers": [dns.address],
                    "default": {"backoff": backoff},
                    "providers": {p: {"mx": [f"*.{p}-mail.test"]} for p in PROVIDERS},
                    "backoff": {
                        "threshold": 5,
                        "window-seconds": 10,
                        "pause-seconds": 5,
                        "max-pause-seconds": 20,
                        "resume-rate-per-minute": 120,
                        "ramp-step-seconds": 5,
                        "ramp-steps": 3,
                    },
                },
            }
        },
    )
    gpath, cpath = testing.write_configs(directory / "configs", customer)
    config = load_config(gpath, cpath, service="postfixlog")
    context = Context.create(config)
    service = PostfixLogService(
        config, registry=context.registry, health=context.health, stopper=context.stopper, name="bench-shaping"
    )
    service.instance.dns_server = dns.address
    thread = threading.Thread(target=service.run, name="postfixlog")
    thread.start()
    try:
        wait_until(lambda: context.health.ready()[0], 60, what="PostfixLog ready")
        mails = {
            p: [
                mail(f"{p}{i:05d}", f"u{i}@{'' if i % 2 else 'hosted-by-'}{p}.test", args.size)
                for i in range(args.messages)
            ]
            for p in PROVIDERS
        }
        started = time.monotonic()
        pipe = client.pipeline(transaction=False)
        for i in range(args.messages):
            for p in PROVIDERS:
                pipe.xadd("INCOMING-TO-POSTFIX", dict(mails[p][i].to_fields()))
        pipe.execute()
        done: dict[str, float] = {}

        def progress() -> bool:
            delivered: dict[str, int] = dict.fromkeys(PROVIDERS, 0)
            for _, fields in client.xrange("EVENT_QUEUE"):
                event = decode_event(fields)
                if event["event"] == "delivered":
                    provider = event["uuid"].rstrip("0123456789")
                    delivered[provider] = delivered.get(provider, 0) + 1
            for p in PROVIDERS:
                if p not in done and delivered[p] >= args.messages:
                    done[p] = time.monotonic() - started
            return len(done) == len(PROVIDERS)

        wait_until(progress, 900, interval_s=0.5, what="every provider's messages delivered")

        def metric(name: str, **labels: str) -> float:
            return float(context.registry.get_sample_value(name, labels) or 0.0)

        return {
            "rate": {p: args.messages / done[p] for p in PROVIDERS},
            "421": sinks["alpha"].handler.throttled,
            "others_421": sum(sinks[p].handler.throttled for p in ("beta", "gamma")),
            "pauses": metric("mailer_postfixlog_provider_pauses_total", provider="alpha", kind="slow"),
            "held": sum(
                metric("mailer_postfixlog_provider_messages_total", provider="alpha", outcome=outcome)
                for outcome in ("paused", "rate", "withdrawn")
            ),
            "bounces": sum(1 for _, f in client.xrange("EVENT_QUEUE") if decode_event(f)["event"] == "bounce"),
        }
    finally:
        context.stopper.stop()
        thread.join(120)
        for sink in sinks.values():
            sink.stop()
        client.close()


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per figure, the median over the runs."""
    out: dict[str, Any] = {"rate": {p: statistics.median(r["rate"][p] for r in runs) for p in PROVIDERS}}
    for key in ("421", "others_421", "pauses", "held", "bounces"):
        out[key] = statistics.median(r[key] for r in runs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=120, help="messages per provider")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--throttle", default="20/5s", help="alpha's sink: recipients per window before 421")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each mode, taking turns (medians shown)")
    args = parser.parse_args()
    say(
        f"shaping benchmark on {os.cpu_count()} cores: {args.messages} messages to each of {', '.join(PROVIDERS)}; "
        f"alpha answers 421 4.7.0 beyond {args.throttle}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-shaping-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        for round_ in range(1, args.rounds + 1):
            (work / f"r{round_}").mkdir(mode=0o755)
        redis_server = RedisProcess(work / "redis").start()
        try:
            with DnsServer(dns_records(addresses()), ttl=300) as dns:
                runs: dict[str, list[dict[str, Any]]] = {"without back-off": [], "with back-off": []}
                for round_ in range(1, args.rounds + 1):
                    for backoff in (False, True):
                        label = "with back-off" if backoff else "without back-off"
                        say(f"   round {round_}, {label} ...")
                        runs[label].append(run(work / f"r{round_}", backoff, args, redis_server.port, dns))
                results = {label: median_of(values) for label, values in runs.items()}
        finally:
            redis_server.stop()
    say("")
    say(f"{'':24}" + "".join(f"{label:>20}" for label in results))
    for p in PROVIDERS:
        say(f"  {p + ' msg/s':22}" + "".join(f"{r['rate'][p]:20.1f}" for r in results.values()))
    say(f"  {'421 answers (alpha)':22}" + "".join(f"{r['421']:20.0f}" for r in results.values()))
    say(f"  {'421 answers (others)':22}" + "".join(f"{r['others_421']:20.0f}" for r in results.values()))
    say(f"  {'alpha pauses':22}" + "".join(f"{r['pauses']:20.0f}" for r in results.values()))
    say(f"  {'alpha held in Redis':22}" + "".join(f"{r['held']:20.0f}" for r in results.values()))
    say(f"  {'bounces':22}" + "".join(f"{r['bounces']:20.0f}" for r in results.values()))
    say(f"(medians of {args.rounds} runs of each, taking turns)")


if __name__ == "__main__":
    main()
