"""Crash test of the whole pipeline: SIGKILL every service while mail flows, then account for it.

Sends N messages (default 5,000, spread over ``--duration`` seconds) through Receiver with 20
SMTP sessions that retry until they get ``250`` (as a real MTA does).  Meanwhile a chaos thread
SIGKILLs each of the seven services (every process of its group, e.g. Postfix with PostfixLog)
at random moments and restarts it,
SIGKILLs redis-server once and restarts it on the same data, and SIGKILLs Postfix' master once
(PostfixLog restarts it).  Then it waits for the queues to drain and prints the accounting:

* accepted      -- messages that got ``250`` from Receiver (each has its own X-Uuid)
* delivered     -- messages the sink ("the internet") received, per uuid
* terminal      -- ``delivered`` / ``bounce`` events at the webhook, per uuid
* lost          -- accepted but never delivered, or without a terminal event (must be 0)
* duplicates    -- deliveries and events beyond the first (the at-least-once window)

About 5 % of the recipients are ``bounce*@`` addresses: their terminal outcome is a hard
bounce event instead of a delivery.

``--failover``: Redis runs as a primary with ``--replicas`` replicas and three sentinels on
loopback (the ``deploy/ha`` layout, :mod:`devtools.redisha`), every service finds the primary
through the sentinels, and the chaos is only this: the primary is SIGKILLed ``--kills`` times
while the messages flow, and restarted ``--down`` seconds later (a pod that comes back; it
rejoins as a replica).  Besides the accounting it prints, per kill, how long until the sentinels
named a new primary and until Receiver answered ``250`` again.  ``--wait off`` turns the
replica acknowledgement off (``wait-replicas: 0``) to measure what asynchronous replication
alone loses.
"""

from __future__ import annotations

import argparse
import contextlib
import email.parser
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid as uuidlib
from collections import Counter
from pathlib import Path
from typing import Any

import loadgen
import redis

from common.addressing import message_id_uuid
from common.config.base import RedisServer
from common.queue import connect
from devtools import testing
from devtools.redisha import LocalRedisHA
from devtools.servers import wait_until
from devtools.sink import Received
from devtools.stack import Stack, free_ports

QUEUES = ("IB-MAIL-QUEUE-P0", "IB-MAIL-QUEUE-P1", "INCOMING-TO-POSTFIX", "EVENT_QUEUE")
KILLABLE = ("receiver", "httpreceiver", "transformer", "postfixlog", "backdata", "mxserver", "redis-sidecar")


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class Chaos(threading.Thread):
    """Kills and restarts services at random moments until told to stop."""

    def __init__(self, stack: Stack, rng: random.Random, interval: tuple[float, float]) -> None:
        super().__init__(name="chaos", daemon=True)
        self.stack = stack
        self.rng = rng
        self.interval = interval
        self.done = threading.Event()
        self.log: list[str] = []
        self.lock = threading.Lock()  # held while a service is down
        plan = [*KILLABLE, *KILLABLE, "redis-server", "postfix-master"]
        rng.shuffle(plan)
        self.plan = plan

    def run(self) -> None:
        started = time.monotonic()
        for action in self.plan:
            if self.done.wait(self.rng.uniform(*self.interval)):
                return
            with self.lock:
                at = time.monotonic() - started
                try:
                    self._act(action)
                    self.log.append(f"{at:6.1f}s  {action}")
                except (RuntimeError, TimeoutError) as exc:
                    self.log.append(f"{at:6.1f}s  {action}: FAILED {exc}")
        self.done.set()

    def _act(self, action: str) -> None:
        stack = self.stack
        if action == "redis-server":
            assert stack.redis is not None
            stack.redis.kill()
            time.sleep(self.rng.uniform(0.2, 1.5))  # down for a moment, like a pod restart
            stack.redis.start()
        elif action == "postfix-master":
            pid_file = stack.run_dir / "state" / "postfix" / "queue" / "pid" / "master.pid"
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, 9)
            postfix = stack.procs["postfixlog"]
            wait_until(
                lambda: _master_pid(pid_file) not in (None, pid) or postfix.poll() is not None,
                timeout_s=60,
                what="PostfixLog to restart Postfix",
            )
        else:
            stack.kill_service(action)
            time.sleep(self.rng.uniform(0.1, 2.0))
            stack.start_service(action, timeout_s=120)


class PrimaryKiller(threading.Thread):
    """SIGKILLs the Redis primary ``kills`` times (spread over ``window`` seconds), restarting each ``down`` s later."""

    def __init__(self, ha: LocalRedisHA, kills: int, window: float, down: float) -> None:
        super().__init__(name="failover", daemon=True)
        self.ha = ha
        self.kills = kills
        self.window = window
        self.down = down
        self.done = threading.Event()
        #: (monotonic time of the kill, killed port, seconds until the sentinels named another primary)
        self.events: list[tuple[float, int, float]] = []
        self.log: list[str] = []

    def run(self) -> None:
        started = time.monotonic()
        gap = self.window / (self.kills + 1)
        for n in range(self.kills):
            if self.done.wait(max(started + gap * (n + 1) - time.monotonic(), 0)):
                return
            old = self.ha.primary_port()
            if old is None:
                self.log.append("no primary known; kill skipped")
                continue
            killed_at = time.monotonic()
            self.ha.kill(old)
            try:
                switched = self.ha.wait_for_failover(old, timeout_s=60)
            except TimeoutError:
                switched = float("nan")
            self.events.append((killed_at, old, switched))
            self.log.append(f"{killed_at - started:6.1f}s  SIGKILL primary :{old}; new primary after {switched:.2f}s")
            self.done.wait(max(killed_at + self.down - time.monotonic(), 0))
            self.ha.restart(old)
            self.log.append(f"{time.monotonic() - started:6.1f}s  :{old} restarted (rejoins as a replica)")
        self.done.set()


def _master_pid(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError):
        return None


def plan_messages(n: int, size: int, rng: random.Random) -> list[tuple[str, str, bytes]]:
    sender = f"news@{testing.SENDER_DOMAIN}"
    out = []
    for i in range(n):
        uuid = f"c{i:05d}{uuidlib.uuid4().hex[:10]}"
        rcpt = f"bounce{i}@dest.test" if rng.random() < 0.05 else f"user{i}@dest.test"
        out.append((uuid, rcpt, loadgen.message(uuid, rcpt, size, sender)))
    return out


def drained(client: redis.Redis, stack: Stack) -> bool:
    try:
        if any(int(client.xlen(q)) for q in QUEUES):
            return False
    except redis.exceptions.RedisError:
        return False
    queue_dir = stack.run_dir / "state" / "postfix" / "queue"
    return not any(any((queue_dir / q).rglob("*")) for q in ("incoming", "active", "deferred", "maildrop"))


def uuid_of(received: Received, parser: email.parser.BytesHeaderParser) -> str:
    message_id = str(parser.parsebytes(received.data).get("Message-ID", ""))
    return message_id_uuid(message_id) or ""


def account(stack: Stack, plan: list[tuple[str, str, bytes]], accepted: set[str]) -> dict[str, Any]:
    parser = email.parser.BytesHeaderParser()
    bounce_rcpts = {u for u, r, _ in plan if r.startswith("bounce")}
    deliveries = Counter(uuid_of(m, parser) for m in stack.sink.messages)
    events = [e for e in stack.webhook.events if e.get("event") in ("delivered", "bounce")]
    terminal = Counter(e["uuid"] for e in events)
    ids = Counter(e.get("event_id") for e in events)
    lost_delivery = sorted(u for u in accepted - bounce_rcpts if deliveries[u] == 0)
    lost_event = sorted(u for u in accepted if terminal[u] == 0)
    return {
        "accepted": len(accepted),
        "delivered": sum(1 for u in accepted if deliveries[u]),
        "terminal": sum(1 for u in accepted if terminal[u]),
        "bounced": sum(1 for u in accepted & bounce_rcpts if terminal[u]),
        "lost": sorted(set(lost_delivery) | set(lost_event)),
        "lost_delivery": lost_delivery,
        "lost_event": lost_event,
        "dup_deliveries": sum(c - 1 for c in deliveries.values() if c > 1),
        "dup_events_same_id": sum(c - 1 for c in ids.values() if c > 1),
        "dup_terminal_per_uuid": sum(c - 1 for c in terminal.values() if c > 1),
        "unexpected": sorted(set(deliveries) - {u for u, _, _ in plan} - {""}),
        "events_by_kind": Counter(e.get("event") for e in stack.webhook.events),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument(
        "--duration",
        type=float,
        default=80.0,
        help="spread the submissions over this many seconds, so the chaos hits mail in flight",
    )
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument(
        "--interval",
        type=float,
        nargs=2,
        default=(0.5, 2.5),
        metavar=("MIN", "MAX"),
        help="seconds between two chaos actions",
    )
    parser.add_argument("--drain-timeout", type=float, default=600.0)
    parser.add_argument("--only", nargs="*", default=None, help="restrict the chaos plan to these actions")
    parser.add_argument("--keep", action="store_true", help="keep the run directory (logs, state) for inspection")
    parser.add_argument(
        "--failover", action="store_true", help="Redis with replicas and sentinels; SIGKILL only the primary"
    )
    parser.add_argument("--replicas", type=int, default=1, help="--failover: replicas of the primary (default 1)")
    parser.add_argument("--kills", type=int, default=1, help="--failover: SIGKILLs of the primary (default 1)")
    parser.add_argument(
        "--down", type=float, default=2.0, help="--failover: seconds before a killed node is restarted (default 2)"
    )
    parser.add_argument(
        "--wait", choices=("on", "off"), default="on", help="--failover: replica acknowledgement (WAIT) before 250"
    )
    args = parser.parse_args()
    rng = random.Random(args.seed)
    # SIGTERM (e.g. from `timeout`) unwinds through the `finally` that stops the stack.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.failover:
        return failover_main(args, rng)
    say(
        f"chaos benchmark: {args.messages} messages, seed {args.seed}, SIGKILL of every service twice, "
        "of redis-server once and of Postfix' master once"
    )
    work = Path(tempfile.mkdtemp(prefix="bench-chaos-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    stack = Stack(
        work / "stack",
        ports=free_ports(),
        customer_override={
            "receiver": {"trusted-networks": ["127.0.0.1/32"]},
        },
        echo=lambda s: None,
    )
    say("starting the stack (Redis, sink, webhook, seven services)")
    try:
        stack.start()
        return run(stack, args, rng)
    finally:
        stack.stop()
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run(stack: Stack, args: argparse.Namespace, rng: random.Random) -> int:
    plan = plan_messages(args.messages, args.size, rng)
    chaos = Chaos(stack, rng, tuple(args.interval))
    if args.only is not None:
        chaos.plan = [a for a in chaos.plan if a in args.only]
    started = time.monotonic()
    chaos.start()
    say(f"sending {len(plan)} messages with {args.sessions} sessions while the chaos thread works")
    outcome = loadgen.submit(
        "127.0.0.1",
        stack.ports["receiver"],
        plan,
        sessions=args.sessions,
        rate=len(plan) / args.duration,
        timeout_s=1800,
    )
    sent = time.monotonic() - started
    say(
        f"accepted {len(outcome.accepted)} in {sent:.1f}s ({outcome.retries} retried submissions, "
        f"{len(outcome.rejected)} rejected)"
    )
    chaos.join(timeout=300)  # finish the plan: every service is killed even after sending ends
    chaos.done.set()
    chaos.join(timeout=120)
    for line in chaos.log:
        say(f"  chaos {line}")
    for name in KILLABLE:  # anything a failed restart left down
        if name not in stack.procs:
            stack.start_service(name, timeout_s=120)
    client = redis.Redis(port=stack.ports["redis"])
    accepted = set(outcome.accepted)
    say("waiting for the queues and Postfix to drain")
    wait_until(lambda: drained(client, stack), timeout_s=args.drain_timeout, interval_s=1, what="drain")
    # The last events travel from Postfix' log to the webhook after the queues look empty.
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: not account(stack, plan, accepted)["lost"], timeout_s=60, interval_s=1, what="last events")
    result = account(stack, plan, accepted)
    dead = {q: int(client.xlen(q + ":dead")) for q in QUEUES}
    total = time.monotonic() - started
    say("")
    say(f"accounting after {total:.0f}s (seed {args.seed})")
    say(f"  accepted (250 from Receiver)            {result['accepted']:6d}")
    say(f"  delivered at the sink                   {result['delivered']:6d}")
    say(f"  hard bounces reported (bounce* rcpts)   {result['bounced']:6d}")
    say(f"  with a terminal event at the webhook    {result['terminal']:6d}")
    say(f"  LOST                                    {len(result['lost']):6d}")
    say(f"  duplicate deliveries at the sink        {result['dup_deliveries']:6d}")
    say(f"  duplicate events (same event_id)        {result['dup_events_same_id']:6d}")
    say(f"  extra terminal events per uuid          {result['dup_terminal_per_uuid']:6d}")
    say(f"  dead-lettered entries                   {sum(dead.values()):6d}  {json.dumps(dead)}")
    say(f"  events by kind                          {dict(result['events_by_kind'])}")
    if result["lost"]:
        say(f"  lost uuids (first 20): {result['lost'][:20]}")
        say(
            f"    without delivery: {len(result['lost_delivery'])}, without terminal event: {len(result['lost_event'])}"
        )
    return 1 if result["lost"] else 0


def failover_main(args: argparse.Namespace, rng: random.Random) -> int:
    """``--failover``: the deploy/ha layout on loopback, SIGKILL of the primary while mail flows."""
    say(
        f"failover benchmark: {args.messages} messages, seed {args.seed}, primary + {args.replicas} replica(s) + "
        f"3 sentinels, {args.kills} SIGKILL(s) of the primary, WAIT {args.wait}"
    )
    work = Path(tempfile.mkdtemp(prefix="bench-failover-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    ha = LocalRedisHA(work / "stack" / "state" / "redis-ha", replicas=args.replicas)
    wait = {} if args.wait == "on" else {"common-config": {"redis": {"wait-replicas": 0}}}
    stack = Stack(
        work / "stack",
        ports=free_ports(),
        customer_override=testing.merge({"receiver": {"trusted-networks": ["127.0.0.1/32"]}}, wait),
        echo=lambda s: None,
        ha=ha,
    )
    say("starting the stack (Redis primary, replicas and sentinels, sink, webhook, seven services)")
    try:
        stack.start()
        return run_failover(stack, ha, args, rng)
    finally:
        stack.stop()
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run_failover(stack: Stack, ha: LocalRedisHA, args: argparse.Namespace, rng: random.Random) -> int:
    plan = plan_messages(args.messages, args.size, rng)
    killer = PrimaryKiller(ha, args.kills, args.duration * 0.8, args.down)
    started = time.monotonic()
    killer.start()
    say(f"sending {len(plan)} messages with {args.sessions} sessions while the primary is killed")
    outcome = loadgen.submit(
        "127.0.0.1",
        stack.ports["receiver"],
        plan,
        sessions=args.sessions,
        rate=len(plan) / args.duration,
        timeout_s=1800,
    )
    sent = time.monotonic() - started
    say(
        f"accepted {len(outcome.accepted)} in {sent:.1f}s ({outcome.retries} retried submissions, "
        f"{len(outcome.rejected)} rejected)"
    )
    killer.join(timeout=300)
    for line in killer.log:
        say(f"  failover {line}")
    accept_times = sorted(outcome.accepted.values())
    recoveries = []
    for killed_at, port, switched in killer.events:
        after = next((t for t in accept_times if t > killed_at), None)
        before = max((t for t in accept_times if t <= killed_at), default=None)
        recovery = (after - killed_at) if after is not None else float("nan")
        recoveries.append(recovery)
        gap = (after - before) if after is not None and before is not None else float("nan")
        say(
            f"  kill of :{port}: new primary named after {switched:.2f}s; first 250 after {recovery:.2f}s "
            f"(no 250 for {gap:.2f}s)"
        )
    admin = RedisServer.model_validate({**ha.redis_block(), "wait-replicas": 0})
    client = connect(admin, client_name="bench")
    accepted = set(outcome.accepted)
    say("waiting for the queues and Postfix to drain")
    wait_until(lambda: drained(client, stack), timeout_s=args.drain_timeout, interval_s=1, what="drain")
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: not account(stack, plan, accepted)["lost"], timeout_s=60, interval_s=1, what="last events")
    result = account(stack, plan, accepted)
    dead = {q: int(client.xlen(q + ":dead")) for q in QUEUES}
    total = time.monotonic() - started
    say("")
    say(f"failover accounting after {total:.0f}s (seed {args.seed}, WAIT {args.wait}, {args.replicas} replica(s))")
    say(f"  accepted (250 from Receiver)            {result['accepted']:6d}")
    say(f"  delivered at the sink                   {result['delivered']:6d}")
    say(f"  hard bounces reported (bounce* rcpts)   {result['bounced']:6d}")
    say(f"  with a terminal event at the webhook    {result['terminal']:6d}")
    say(f"  LOST                                    {len(result['lost']):6d}")
    say(f"  duplicate deliveries at the sink        {result['dup_deliveries']:6d}")
    say(f"  duplicate events (same event_id)        {result['dup_events_same_id']:6d}")
    say(f"  extra terminal events per uuid          {result['dup_terminal_per_uuid']:6d}")
    say(f"  dead-lettered entries                   {sum(dead.values()):6d}  {json.dumps(dead)}")
    say(f"  retried submissions (451/lost session)  {outcome.retries:6d}")
    say(f"  until submissions succeed again         {', '.join(f'{r:.2f}s' for r in recoveries) or '-'}")
    if result["lost"]:
        say(f"  lost uuids (first 20): {result['lost'][:20]}")
    client.close()
    return 1 if result["lost"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
