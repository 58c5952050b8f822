"""Whole-pipeline benchmark: the platform next to Postfix alone and Postfix + OpenDKIM, in one run.

1. Postfix alone: ``smtp-source`` (20 sessions, a 10 KB message file) -> a private Postfix
   (the configuration PostfixLog renders, sandboxed to one nexthop) -> ``smtp-sink``;
   messages/s from the first submission to the last ``status=sent`` line.
2. Postfix + OpenDKIM, the stack a self-hosting user would build instead: the same command and
   Postfix configuration with ``smtpd_milters`` set to an ``opendkim`` milter on a unix socket
   (as Debian configures it: ``/usr/sbin/opendkim``, an RSA-2048 key from ``opendkim-genkey``,
   relaxed/relaxed, ``Mode s``), measured the same way.
3. The whole pipeline: the same ``smtp-source`` command (from a trusted network) -> Receiver ->
   Redis -> Transformer (DKIM RSA-2048) -> PostfixLog -> the same Postfix configuration ->
   ``smtp-sink``; Postfix' log -> PostfixLog -> BackData -> a webhook; messages/s from the
   first submission to the last ``delivered`` event.
   The three run ``--rounds`` times, taking turns (each goes first in turn), and the medians
   are compared (this VM's throughput varies by 10-20 % from one minute to the next).
   Every sink is ``smtp-sink -D`` (it appends what it received to a file); after the rounds
   the DKIM-Signature headers in each file are counted, and the benchmark fails when OpenDKIM
   or the pipeline did not sign every message (a contender that does not sign would be a
   false comparison).
4. Both ratios (pipeline / Postfix alone, goal >= 0.75; pipeline / Postfix + OpenDKIM, goal
   >= 1.5), then submit-to-event latency (p50/p99) at half the measured
   rate with a load generator that gives every message its own X-Uuid, and CPU seconds per
   message of every service (process trees, from /proc) during the pipeline rounds.

``--compare-trace`` measures what the per-message timeline (``common.trace``) costs instead:
two stacks, one with ``common-config.trace.enabled`` and one without, take turns with the same
load (``loadgen``: every message its own X-Uuid, so every message its own timeline); it prints
both rates, the CPU per message of Redis and of every service, and the Redis memory of one
message's timeline (``MEMORY USAGE`` of a sample of keys).

``--profile DIR``: every Python service is sampled by ``py-spy --gil`` (``uv tool install py-spy``)
during the pipeline rounds; the collapsed stacks go to ``DIR/<service>.txt`` and the functions
with the most samples of their own (and the most including their callees) are printed per
service.  Sampling costs CPU, so the rates of such a run are not for comparison.

``--scaling``: the delivery tier alone, with 1, 2 and 3 delivery instances (``postfixlog``
processes, each with its private Postfix, on one Redis: the StatefulSet of issue 17) against a
sink that answers like the internet (each message's DATA answered after a random 50-200 ms,
``--latency-ms``).  ``--messages`` signed-looking 10 KB messages are put on
``INCOMING-TO-POSTFIX`` at once; delivered msg/s is measured from then to the last
``delivered`` event, and printed side by side.  Delivery to real receivers is latency-bound
(each Postfix opens at most ``default_destination_concurrency_limit`` = 20 sessions per
destination), so this is where more instances help, unlike the CPU-bound loopback runs above.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

import loadgen

from devtools import testing
from devtools.servers import free_port, require, wait_until
from devtools.stack import Stack, free_ports
from devtools.webhook import Reply, Request, WebhookReceiver
from postfixlog.instance import PostfixInstance

TICKS = os.sysconf("SC_CLK_TCK")


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# -- CPU accounting -----------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds incl. reaped children) of a live process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    ppid = int(fields[1])
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return ppid, (utime + stime + cutime + cstime) / TICKS


def tree_cpu(root: int) -> float:
    """CPU seconds used by ``root`` and every descendant, living or reaped."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            found = _stat(int(entry))
            if found is not None:
                stats[int(entry)] = found
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
            todo.extend(child for child, (parent, _) in stats.items() if parent == pid)
    return total


# -- 1. Postfix alone ---------------------------------------------------------------------------


def smtp_sink(port: int, dump: Path | None = None) -> subprocess.Popen[bytes]:
    """Postfix' C sink; as root it must drop to the postfix user.

    With ``dump``, every message received is appended to that file (``-D``; its directory is
    handed to the postfix user), so the signatures can be counted afterwards.
    """
    options: list[str] = []
    if dump is not None:
        dump.parent.mkdir(parents=True, exist_ok=True)
        shutil.chown(dump.parent, "postfix", "postfix")
        options = ["-D", str(dump)]
    proc = subprocess.Popen(
        [require("smtp-sink"), "-u", "postfix", *options, f"127.0.0.1:{port}", "256"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until(lambda: _port_open(port), timeout_s=10, what="smtp-sink")
    return proc


def _port_open(port: int) -> bool:
    from devtools.servers import port_open

    return port_open("127.0.0.1", port)


def count_sent(log: Path) -> int:
    if not log.exists():
        return 0
    with log.open("rb") as f:
        return sum(1 for line in f if b" status=sent " in line)


def count_signed(dump: Path) -> tuple[int, int, str]:
    """(messages, messages with a DKIM-Signature header, the first one's leading tags) in an ``smtp-sink -D`` file."""
    messages = signed = 0
    sample = ""
    in_header = False
    if not dump.exists():
        return 0, 0, sample
    with dump.open("rb") as f:
        for line in f:
            if line.startswith(b"X-Client-Addr: "):
                messages += 1
                in_header = True
            elif in_header and line.startswith(b"DKIM-Signature:"):
                signed += 1
                in_header = False
                sample = sample or line.decode("ascii", "replace").strip()
            elif line in (b"\n", b"\r\n"):
                in_header = False
    return messages, signed, sample


def message_file(work: Path, size: int) -> Path:
    """The pre-formatted message smtp-source sends to both targets (it has an X-Uuid)."""
    path = work / "message.eml"
    raw = loadgen.message("benchsource", "rcpt@dest.test", size, f"news@{testing.SENDER_DOMAIN}")
    path.write_bytes(raw.replace(b"\r\n", b"\n"))  # smtp-source turns LF into CRLF
    return path


def smtp_source(port: int, n: int, sessions: int, message: Path) -> None:
    subprocess.run(
        [
            require("smtp-source"),
            "-s",
            str(sessions),
            "-m",
            str(n),
            "-F",
            str(message),
            "-f",
            f"news@{testing.SENDER_DOMAIN}",
            "-t",
            "rcpt@dest.test",
            f"127.0.0.1:{port}",
        ],
        check=True,
        timeout=900,
    )


class OpenDkim:
    """``opendkim`` signing as a milter on a unix socket, configured the way Debian does it.

    Debian's ``/etc/opendkim.conf`` with a signing key: ``Socket local:...``, ``UMask 007``,
    ``UserID opendkim``, ``OversignHeaders From``; here ``Canonicalization relaxed/relaxed``
    and ``Mode s`` (signing only: nothing asks a resolver), a fresh RSA-2048 key
    (``opendkim-genkey -b 2048``), and the group ``postfix`` instead of adding the postfix user
    to the opendkim group, so that smtpd may open the socket without changing the machine.
    """

    SELECTOR = "opendkim"

    def __init__(self, domain: str) -> None:
        # opendkim refuses a configuration or key file below a directory other users may write
        # to (/var/tmp, /tmp), so its files live in a private directory under /run (root, 0755).
        self.directory = Path(tempfile.mkdtemp(prefix="bench-opendkim-", dir="/run"))
        self.directory.chmod(0o755)
        keys, run_dir = self.directory / "keys", self.directory / "run"
        keys.mkdir(parents=True)
        run_dir.mkdir()
        subprocess.run(
            [require("opendkim-genkey"), "-b", "2048", "-d", domain, "-s", self.SELECTOR, "-D", str(keys)],
            check=True,
            timeout=60,
        )
        key = keys / f"{self.SELECTOR}.private"
        for path, mode in ((keys, 0o700), (key, 0o600)):
            shutil.chown(path, "opendkim", "opendkim")
            path.chmod(mode)
        shutil.chown(run_dir, "opendkim", "postfix")
        run_dir.chmod(0o750)
        self.socket = run_dir / "opendkim.sock"
        config = self.directory / "opendkim.conf"
        config.write_text(
            "Syslog\t\t\tno\n"
            "Mode\t\t\ts\n"
            f"Domain\t\t\t{domain}\n"
            f"Selector\t\t{self.SELECTOR}\n"
            f"KeyFile\t\t\t{key}\n"
            "Canonicalization\trelaxed/relaxed\n"
            "SignatureAlgorithm\trsa-sha256\n"
            "OversignHeaders\t\tFrom\n"
            "UserID\t\t\topendkim:postfix\n"
            "UMask\t\t\t007\n"
            f"Socket\t\t\tlocal:{self.socket}\n"
            f"PidFile\t\t\t{run_dir / 'opendkim.pid'}\n"
        )
        with (self.directory / "opendkim.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [require("opendkim"), "-f", "-x", str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        wait_until(lambda: self.socket.is_socket() or self.proc.poll() is not None, timeout_s=20, what="opendkim")
        if self.proc.poll() is not None:
            log_text = (self.directory / "opendkim.log").read_text(errors="replace")
            shutil.rmtree(self.directory, ignore_errors=True)
            raise RuntimeError(f"opendkim exited with {self.proc.returncode}: {log_text}")

    def milter_settings(self) -> dict[str, str | int | bool]:
        """main.cf settings that put this milter in front of Postfix' queue."""
        return {
            "smtpd_milters": f"unix:{self.socket}",
            "non_smtpd_milters": "$smtpd_milters",
            "milter_protocol": 6,
            # An unreachable milter must not let unsigned mail through (the counts check it too).
            "milter_default_action": "tempfail",
        }

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)


class PostfixAlone:
    """smtp-source -> Postfix (with an optional OpenDKIM milter) -> smtp-sink, kept running between rounds."""

    def __init__(self, work: Path, name: str = "postfix-alone", opendkim: OpenDkim | None = None) -> None:
        self.sink_port, self.smtpd_port = free_port(), free_port()
        self.dump = work / "dumps" / f"{name}.dump"
        self.sink = smtp_sink(self.sink_port, self.dump)
        self.opendkim = opendkim
        self.instance = PostfixInstance(
            work / name,
            smtpd_port=self.smtpd_port,
            nexthop=f"[127.0.0.1]:{self.sink_port}",
            main_cf=opendkim.milter_settings() if opendkim else None,
        )
        self.instance.start()
        self.cpu_per_message: list[float] = []

    def _cpu(self, master: int) -> float:
        milter = tree_cpu(self.opendkim.proc.pid) if self.opendkim else 0.0
        return tree_cpu(master) + tree_cpu(self.sink.pid) + milter

    def run(self, n: int, sessions: int, message: Path) -> float:
        before = count_sent(self.instance.log_path)
        master = self.instance.pid or 0
        cpu_before = self._cpu(master)
        started = time.monotonic()
        smtp_source(self.smtpd_port, n, sessions, message)
        wait_until(
            lambda: count_sent(self.instance.log_path) >= before + n,
            timeout_s=900,
            interval_s=0.1,
            what="Postfix to deliver everything",
        )
        elapsed = time.monotonic() - started
        self.cpu_per_message.append((self._cpu(master) - cpu_before) / n)
        return n / elapsed

    def close(self) -> None:
        self.instance.stop()
        self.sink.terminate()
        self.sink.wait(10)


# -- 2. the pipeline ----------------------------------------------------------------------------


class DeliveredWatch:
    """Webhook responder that notes when each uuid's ``delivered`` event arrived."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.arrived: dict[str, float] = {}
        self.kinds: dict[str, int] = {}
        self.count: dict[str, int] = {}

    def __call__(self, request: Request) -> Reply:
        now = time.monotonic()
        events = json.loads(request.body)
        with self.lock:
            for event in events:
                self.kinds[event["event"]] = self.kinds.get(event["event"], 0) + 1
                if event["event"] == "delivered":
                    self.arrived.setdefault(event["uuid"], now)
                    self.count[event["uuid"]] = self.count.get(event["uuid"], 0) + 1
        return 200, {}, 0.0

    def delivered_of(self, uuid: str) -> int:
        with self.lock:
            return self.count.get(uuid, 0)

    def delivered(self, uuids: set[str]) -> int:
        with self.lock:
            return sum(1 for u in uuids if u in self.arrived)


def batch(prefix: str, n: int, size: int) -> list[tuple[str, str, bytes]]:
    sender = f"news@{testing.SENDER_DOMAIN}"
    out = []
    for i in range(n):
        uuid = f"{prefix}{i:06d}{uuidlib.uuid4().hex[:8]}"
        out.append((uuid, f"rcpt{i}@dest.test", loadgen.message(uuid, f"rcpt{i}@dest.test", size, sender)))
    return out


def service_pids(stack: Stack) -> dict[str, int]:
    pids = {name: proc.pid for name, proc in stack.procs.items()}
    if stack.redis is not None and stack.redis.proc is not None:
        pids["redis-server"] = stack.redis.proc.pid
    return pids


def _child_named(parent: int, name: str) -> int | None:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
            found = _stat(int(entry))
        except OSError:
            continue
        if comm == name and found is not None and found[0] == parent:
            return int(entry)
    return None


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds per service; Postfix (master and its daemons) apart from PostfixLog."""
    snapshot = {name: tree_cpu(pid) for name, pid in pids.items()}
    if "postfixlog" in pids:
        master = _child_named(pids["postfixlog"], "master")
        postfix = tree_cpu(master) if master else 0.0
        snapshot["postfix (master + daemons)"] = postfix
        snapshot["postfixlog"] -= postfix
    return snapshot


def run(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    ports = free_ports()
    override = {
        "receiver": {"trusted-networks": ["127.0.0.1/32"], "processes": args.receiver_processes},
        "transformer": {"unsubscribe-url": None},
    }
    message = message_file(work, args.size)
    cleanup = contextlib.ExitStack()  # whatever was started is stopped, even when a later start fails
    try:
        alone = PostfixAlone(work)
        cleanup.callback(alone.close)
        opendkim = OpenDkim(testing.SENDER_DOMAIN)
        cleanup.callback(opendkim.close)
        signing = PostfixAlone(work, "postfix-opendkim", opendkim)
        cleanup.callback(signing.close)
        stack = Stack(work / "stack", ports=ports, peers=False, customer_override=override)
        cleanup.callback(stack.stop)
        stack.start()
        pipeline_dump = work / "dumps" / "pipeline.dump"
        sink = smtp_sink(ports["sink"], pipeline_dump)
        cleanup.callback(_stop, sink)
        watch = DeliveredWatch()
        hook = WebhookReceiver("127.0.0.1", ports["webhook"], responder=watch).start()
        cleanup.callback(hook.stop)
        say("   warming up all three")
        alone.run(200, args.sessions, message)
        signing.run(200, args.sessions, message)
        warm = batch("warm", 100, args.size)
        loadgen.submit("127.0.0.1", ports["receiver"], warm, sessions=args.sessions)
        wait_until(lambda: watch.delivered({u for u, _, _ in warm}) == len(warm), timeout_s=120, what="warm-up")

        pids = service_pids(stack)
        pids["smtp-sink"] = sink.pid
        if args.profile is not None:
            cleanup.enter_context(Profiler(args.profile, {n: p for n, p in pids.items() if n in PROFILED}))
        alone_rates: list[float] = []
        dkim_rates: list[float] = []
        rates: list[float] = []
        cpu_total = dict.fromkeys(cpu_snapshot(pids), 0.0)

        def pipeline_round() -> None:
            before = cpu_snapshot(pids)
            target = watch.delivered_of("benchsource") + args.messages
            started = time.monotonic()
            smtp_source(ports["receiver"], args.messages, args.sessions, message)
            wait_until(
                lambda: watch.delivered_of("benchsource") >= target,
                timeout_s=900,
                interval_s=0.1,
                what="every delivered event",
            )
            rates.append(args.messages / (time.monotonic() - started))
            after = cpu_snapshot(pids)
            for name in cpu_total:
                cpu_total[name] += after[name] - before[name]

        turns = [
            lambda: alone_rates.append(alone.run(args.messages, args.sessions, message)),
            lambda: dkim_rates.append(signing.run(args.messages, args.sessions, message)),
            pipeline_round,
        ]
        for round_ in range(1, args.rounds + 1):
            shift = (round_ - 1) % len(turns)
            for turn in turns[shift:] + turns[:shift]:  # each contender goes first once in three rounds
                turn()
            say(
                f"   round {round_}: Postfix alone {alone_rates[-1]:6,.0f} msg/s, Postfix + OpenDKIM "
                f"{dkim_rates[-1]:6,.0f} msg/s, pipeline {rates[-1]:6,.0f} msg/s; ratios "
                f"{rates[-1] / alone_rates[-1]:.2f} and {rates[-1] / dkim_rates[-1]:.2f}"
            )
        cpu = {name: value / (args.messages * args.rounds) for name, value in cpu_total.items()}
        signed = {
            "Postfix alone": count_signed(alone.dump),
            "Postfix + OpenDKIM": count_signed(signing.dump),
            "pipeline": count_signed(pipeline_dump),
        }

        rate = statistics.median(rates)
        half = rate / 2
        count = max(100, int(half * args.latency_seconds))
        say(f"4. latency at half load: {count} messages at {half:.0f} msg/s, each its own X-Uuid")
        accepted_at: dict[str, float] = {}
        slow = batch("lat", count, args.size)
        loadgen.submit(
            "127.0.0.1",
            ports["receiver"],
            slow,
            sessions=args.sessions,
            rate=half,
            on_accept=lambda u, t: accepted_at.__setitem__(u, t),
        )
        wait_until(
            lambda: watch.delivered(set(accepted_at)) >= len(accepted_at),
            timeout_s=600,
            what="latency-phase deliveries",
        )
        with watch.lock:
            latencies = sorted(watch.arrived[u] - t for u, t in accepted_at.items())
        return {
            "alone": alone_rates,
            "opendkim": dkim_rates,
            "rates": rates,
            "cpu": cpu,
            "latencies": latencies,
            "alone_cpu": statistics.median(alone.cpu_per_message[1:] or [0.0]),
            "opendkim_cpu": statistics.median(signing.cpu_per_message[1:] or [0.0]),
            "signed": signed,
        }
    finally:
        cleanup.close()


PROFILED = ("receiver", "transformer", "postfixlog", "backdata")


def spy_command(spy: str) -> list[str]:
    """``py-spy record``: children too, only threads holding the GIL (CPU, not waiting), raw stacks."""
    return [spy, "record", "--subprocesses", "--gil", "--nonblocking", "--rate", "250", "--format", "raw"]


class Profiler:
    """``py-spy record`` of some processes (and their children) while the context is open."""

    def __init__(self, directory: Path, pids: dict[str, int]) -> None:
        spy = shutil.which("py-spy") or str(Path.home() / ".local/bin/py-spy")
        if not Path(spy).exists():
            raise SystemExit("--profile needs py-spy on PATH (uv tool install py-spy)")
        directory.mkdir(parents=True, exist_ok=True)
        self.files = {name: directory / f"{name}.txt" for name in pids}
        self.procs = [
            subprocess.Popen(
                [*spy_command(spy), "--output", str(self.files[name]), "--pid", str(pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for name, pid in pids.items()
        ]

    def __enter__(self) -> Profiler:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            proc.wait(60)
        for name, path in self.files.items():
            say(f"  profile of {name} ({path}):")
            for line in profile_top(path):
                say(f"    {line}")


def profile_top(path: Path, top: int = 12) -> list[str]:
    """The functions with the most samples of their own, then including callees (collapsed stacks)."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines() if path.exists() else []:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_frame_name(frame) for frame in stack.split(";") if not frame.startswith("process ")]
        n = int(count)
        total += n
        if frames:
            own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + n
    if not total:
        return ["no samples"]
    lines = [f"{total:,} samples; own:"]
    lines += [f"  {100 * n / total:5.1f} %  {name}" for name, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]]
    lines.append("including callees:")
    lines += [
        f"  {100 * n / total:5.1f} %  {name}" for name, n in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]
    ]
    return lines


def _frame_name(frame: str) -> str:
    """``function (file.py)`` of py-spy's ``function (path/file.py:line)``."""
    function, _, where = frame.partition(" (")
    return f"{function} ({where.rsplit(':', 1)[0].rsplit('/', 1)[-1]})"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(10)


class TracedStack:
    """One whole stack with tracing on or off, its sink and its webhook."""

    def __init__(self, work: Path, traced: bool, args: argparse.Namespace) -> None:
        self.traced = traced
        self.ports = free_ports()
        override = {
            "receiver": {"trusted-networks": ["127.0.0.1/32"], "processes": args.receiver_processes},
            "transformer": {"unsubscribe-url": None},
            "common-config": {"trace": {"enabled": traced}},
        }
        self.stack = Stack(
            work / f"stack-{'on' if traced else 'off'}", ports=self.ports, peers=False, customer_override=override
        )
        self.stack.start()
        self.sink = smtp_sink(self.ports["sink"])
        self.watch = DeliveredWatch()
        self.hook = WebhookReceiver("127.0.0.1", self.ports["webhook"], responder=self.watch).start()
        self.pids = service_pids(self.stack)
        self.rates: list[float] = []
        self.cpu: dict[str, float] = dict.fromkeys(cpu_snapshot(self.pids), 0.0)

    def round(self, n: int, sessions: int, size: int) -> float:
        """``n`` messages, each its own X-Uuid (one timeline each, as in production)."""
        messages = batch(f"t{len(self.rates)}{'on' if self.traced else 'off'}", n, size)
        uuids = {u for u, _, _ in messages}
        before = cpu_snapshot(self.pids)
        started = time.monotonic()
        loadgen.submit("127.0.0.1", self.ports["receiver"], messages, sessions=sessions)
        wait_until(lambda: self.watch.delivered(uuids) >= n, timeout_s=900, interval_s=0.1)
        self.rates.append(n / (time.monotonic() - started))
        after = cpu_snapshot(self.pids)
        for name in self.cpu:
            self.cpu[name] += after[name] - before[name]
        return self.rates[-1]

    def trace_bytes(self) -> tuple[int, float, float]:
        """(traced uuids, mean bytes per timeline, mean entries per timeline) from a sample."""
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.ports["redis"])
        try:
            names = [k for k in client.scan_iter(match="IB:trace:*", count=1000)][:200]
            if not names:
                return 0, 0.0, 0.0
            sizes = [int(client.memory_usage(k, samples=0) or 0) for k in names]
            entries = [int(client.llen(k)) for k in names]
            return len(names), statistics.mean(sizes), statistics.mean(entries)
        finally:
            client.close()

    def close(self) -> None:
        self.hook.stop()
        self.stack.stop()
        self.sink.terminate()
        self.sink.wait(10)


def compare_trace(work: Path, args: argparse.Namespace) -> None:
    """``--compare-trace``: the pipeline with and without timelines, taking turns."""
    say("stacks with and without common-config.trace, taking turns (same load: loadgen, one X-Uuid per message)")
    on, off = TracedStack(work, True, args), TracedStack(work, False, args)
    try:
        for stack in (on, off):
            stack.round(200, args.sessions, args.size)  # warm-up, not counted
            stack.rates.clear()
            stack.cpu = dict.fromkeys(stack.cpu, 0.0)
        for round_ in range(1, args.rounds + 1):
            for stack in (on, off) if round_ % 2 else (off, on):
                stack.round(args.messages, args.sessions, args.size)
            say(f"   round {round_}: trace on {on.rates[-1]:6,.0f} msg/s, trace off {off.rates[-1]:6,.0f} msg/s")
        count, size, entries = on.trace_bytes()
    finally:
        on.close()
        off.close()
    total = args.messages * args.rounds
    rate_on, rate_off = statistics.median(on.rates), statistics.median(off.rates)
    say("")
    say("results (medians of the rounds)")
    say(f"  pipeline with timelines      {rate_on:8,.0f} msg/s")
    say(f"  pipeline without timelines   {rate_off:8,.0f} msg/s   (cost {100 * (1 - rate_on / rate_off):+.1f} %)")
    say("  CPU per message (ms)                on     off")
    for name in sorted(on.cpu, key=lambda n: -on.cpu[n]):
        say(f"    {name:32s} {on.cpu[name] / total * 1000:6.3f}  {off.cpu.get(name, 0.0) / total * 1000:6.3f}")
    cpu_on, cpu_off = sum(on.cpu.values()) / total * 1000, sum(off.cpu.values()) / total * 1000
    say(f"    {'total':32s} {cpu_on:6.3f}  {cpu_off:6.3f}")
    say(
        f"  Redis memory per timeline: {size:,.0f} bytes ({entries:.1f} entries; sample of {count} keys): "
        f"{size * 1_000_000 * 7 / 1e9:,.1f} GB for a million messages a day kept 7 days"
    )


# -- --scaling: 1, 2, 3 delivery instances -------------------------------------------------------


def latency_sink(port: int, latency_ms: str, work: Path) -> subprocess.Popen[bytes]:
    """The aiosmtpd sink in a process of its own, answering each DATA after a random delay."""
    log = (work / "sink.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "devtools.sink", "--listen", f"127.0.0.1:{port}", "--latency-ms", latency_ms],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    wait_until(lambda: _port_open(port), timeout_s=20, what="latency sink")
    return proc


def delivered_events(client: Any, queue: str = "EVENT_QUEUE") -> int:
    return int(client.xlen(queue))


def scaling_round(work: Path, instances: int, args: argparse.Namespace, redis_port: int, sink_port: int) -> float:
    """Delivered msg/s of ``instances`` delivery instances for ``args.messages`` queued messages."""
    import redis as redislib

    from common.payloads import OutboundMail
    from devtools.delivery import DeliveryInstance

    client: Any = redislib.Redis(host="127.0.0.1", port=redis_port)
    client.flushall()
    directory = work / f"n{instances}"
    directory.mkdir()
    directory.chmod(0o755)
    running = [
        DeliveryInstance(directory, i, redis_port=redis_port, nexthop=f"[127.0.0.1]:{sink_port}")
        for i in range(instances)
    ]
    try:
        for instance in running:
            instance.start()
        sender = f"news@{testing.SENDER_DOMAIN}"
        mails = []
        for i in range(args.messages):
            uuid = f"scale{instances}x{i:06d}"
            rcpt = f"rcpt{i}@dest.test"
            mails.append(
                OutboundMail(
                    raw=loadgen.message(uuid, rcpt, args.size, sender),
                    uuid=uuid,
                    mail_from=f"bounce-{uuid}-aaaaaaaaaa@{testing.RETURN_PATH_DOMAIN}",
                    recipients=(rcpt,),
                    from_domain=testing.SENDER_DOMAIN,
                ).to_fields()
            )
        started = time.monotonic()
        pipe = client.pipeline(transaction=False)
        for fields in mails:
            pipe.xadd("INCOMING-TO-POSTFIX", dict(fields))
        pipe.execute()
        wait_until(
            lambda: delivered_events(client) >= args.messages,
            timeout_s=900,
            interval_s=0.1,
            what=f"{args.messages} delivered events",
        )
        rate: float = args.messages / (time.monotonic() - started)
        kinds = {e for _, f in client.xrange("EVENT_QUEUE", count=50) for e in [json.loads(f[b"data"])["event"]]}
        if kinds != {"delivered"}:
            say(f"   warning: events other than delivered: {sorted(kinds)}")
        return rate
    finally:
        for instance in running:
            instance.stop()
        client.close()


def run_scaling(work: Path, args: argparse.Namespace) -> dict[int, list[float]]:
    from devtools.servers import RedisProcess

    redis_server = RedisProcess(work / "redis").start()
    sink_port = free_port()
    sink = latency_sink(sink_port, args.latency_ms, work)
    rates: dict[int, list[float]] = {n: [] for n in (1, 2, 3)}
    try:
        for round_ in range(1, args.rounds + 1):
            for n in (1, 2, 3):
                rates[n].append(scaling_round(work / f"r{round_}", n, args, redis_server.port, sink_port))
                say(f"   round {round_}: {n} instance{'s' if n > 1 else ''}: {rates[n][-1]:6,.0f} msg/s delivered")
    finally:
        sink.terminate()
        sink.wait(10)
        redis_server.stop()
    return rates


def scaling_main(args: argparse.Namespace) -> None:
    say(
        f"delivery scaling on {os.cpu_count()} cores: {args.messages} messages of {args.size} bytes on "
        f"INCOMING-TO-POSTFIX, sink answering each message after {args.latency_ms} ms, {args.rounds} round(s)"
    )
    with tempfile.TemporaryDirectory(prefix="bench-scaling-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        for round_ in range(1, args.rounds + 1):
            (work / f"r{round_}").mkdir()
        rates = run_scaling(work, args)
    medians = {n: statistics.median(values) for n, values in rates.items()}
    say("")
    say("delivered msg/s (median of the rounds), sink latency " + args.latency_ms + " ms")
    say("  instances      " + "".join(f"{n:>12}" for n in medians))
    say("  msg/s          " + "".join(f"{medians[n]:12,.0f}" for n in medians))
    say("  vs 1 instance  " + "".join(f"{medians[n] / medians[1]:11.2f}x" for n in medians))


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000, help="messages per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=10_240)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--latency-seconds", type=float, default=20.0)
    parser.add_argument("--receiver-processes", type=int, default=0, help="receiver.processes (0 = one per core)")
    parser.add_argument(
        "--compare-trace", action="store_true", help="measure the cost of the per-message timelines instead"
    )
    parser.add_argument("--profile", type=Path, help="sample the Python services with py-spy into this directory")
    parser.add_argument("--scaling", action="store_true", help="delivery only: 1, 2 and 3 delivery instances")
    parser.add_argument("--latency-ms", default="50-200", help="--scaling: sink answer delay per message, MIN-MAX")
    args = parser.parse_args()
    if args.compare_trace:
        with tempfile.TemporaryDirectory(prefix="bench-pipeline-", dir="/var/tmp") as tmp:
            os.chmod(tmp, 0o755)
            compare_trace(Path(tmp), args)
        return
    if args.scaling:
        scaling_main(args)
        return
    say(
        f"pipeline benchmark on {os.cpu_count()} cores: {args.rounds} rounds of {args.messages} messages of "
        f"{args.size} bytes, smtp-source -s {args.sessions}, DKIM RSA-2048, Redis appendfsync always"
    )
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        say("1.-3. Postfix alone, Postfix + OpenDKIM and the whole pipeline, taking turns")
        result = run(work, args)
    alone, rate, lat = statistics.median(result["alone"]), statistics.median(result["rates"]), result["latencies"]
    dkim = statistics.median(result["opendkim"])
    ratio, dkim_ratio = rate / alone, rate / dkim
    say("")
    say("results (medians of the rounds)")
    say(f"  Postfix alone (smtp-source -> Postfix -> smtp-sink)      {alone:8,.0f} msg/s")
    say(f"  Postfix + OpenDKIM (milter on a unix socket, RSA-2048)   {dkim:8,.0f} msg/s")
    say(f"  whole pipeline (submission -> webhook 'delivered')        {rate:8,.0f} msg/s")
    say(
        f"  pipeline / Postfix alone                                  {ratio:8.2f}  "
        f"({'meets' if ratio >= 0.75 else 'below'} the 0.75 goal)"
    )
    say(
        f"  pipeline / Postfix + OpenDKIM                             {dkim_ratio:8.2f}  "
        f"({'meets' if dkim_ratio >= 1.5 else 'below'} the 1.5 goal)"
    )
    paired = [(r / a, r / d) for r, a, d in zip(result["rates"], result["alone"], result["opendkim"], strict=True)]
    say(
        f"  the rounds' own ratios (each round's contenders ran back to back), median: "
        f"{statistics.median(x for x, _ in paired):.2f} and {statistics.median(y for _, y in paired):.2f}"
    )
    for name, (received, with_signature, sample) in result["signed"].items():
        say(f"  DKIM-Signature in what the sink received, {name}: {with_signature:,} of {received:,} messages")
        if sample:
            say(f"    first: {sample[:110]}")
    say(
        f"  latency at half load ({len(lat)} msgs): p50 {percentile(lat, 0.5) * 1000:,.0f} ms, "
        f"p99 {percentile(lat, 0.99) * 1000:,.0f} ms, max {max(lat) * 1000:,.0f} ms"
    )
    say("  CPU seconds per message in the pipeline rounds (process trees):")
    for name, value in sorted(result["cpu"].items(), key=lambda kv: -kv[1]):
        say(f"    {name:36s} {value * 1000:7.2f} ms")
    say(f"    {'total':36s} {sum(result['cpu'].values()) * 1000:7.2f} ms")
    say(f"  for comparison, Postfix alone: Postfix + smtp-sink {result['alone_cpu'] * 1000:.2f} ms per message")
    say(f"  Postfix + OpenDKIM: Postfix + opendkim + smtp-sink {result['opendkim_cpu'] * 1000:.2f} ms per message")
    unsigned = [
        name
        for name, (received, with_signature, _) in result["signed"].items()
        if name != "Postfix alone" and with_signature < received
    ]
    if unsigned or not result["signed"]["Postfix + OpenDKIM"][0]:
        say(f"  FAILED: not every message was signed by {', '.join(unsigned) or 'OpenDKIM'}: a false comparison")
        sys.exit(1)


if __name__ == "__main__":
    main()
