"""Receiver benchmark: SMTP acceptance rate next to Postfix smtpd's, on this machine, in one run.

``smtp-source`` (Postfix' load generator) sends ``--messages`` messages of ~10 KB over
``--sessions`` parallel sessions (one message per connection, smtp-source's default) from
127.0.0.1, which the Receiver trusts (``trusted-networks``), to:

* the Receiver with ``--processes`` workers (0 = one per core) and, for comparison, with one
  process; every ``250`` means the message is in a Redis stream with AOF
  ``appendfsync always`` (durable acknowledgement);
* a private Postfix (``postfixlog.instance.PostfixInstance``) whose smtpd accepts into its queue
  (``defer_transports = smtp``: nothing is delivered, acceptance only; Postfix fsyncs each
  queue file before its 250).

smtp-source's generated message has no ``X-Uuid``, which the Receiver requires, so both get the
same pre-formatted message file (``-F``).  The targets take turns for ``--rounds`` rounds (the
machine's load changes over time); the median of each is compared.  Goal: Receiver >= 1.0x
Postfix smtpd.
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
from collections.abc import Callable
from pathlib import Path

import redis

from devtools import testing
from devtools.servers import RedisProcess, free_port, require, wait_until
from postfixlog.instance import PostfixInstance

SOURCE = "/usr/sbin/smtp-source"


def message(size: int) -> bytes:
    """A valid submission of about ``size`` bytes (headers + 74-byte lines), LF line ends."""
    headers = [
        f"From: App <app@{testing.SENDER_DOMAIN}>",
        "To: Someone <someone@dest.test>",
        "Subject: receiver benchmark",
        "X-Uuid: bench0001",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        "",
    ]
    lines, total, i = list(headers), sum(len(h) + 2 for h in headers), 0
    while total < size:
        line = f"line {i:05d} " + "x" * 62
        lines.append(line)
        total += len(line) + 2
        i += 1
    return ("\n".join(lines) + "\n").encode()


def smtp_source(port: int, args: argparse.Namespace, msg_file: Path) -> float:
    """Run smtp-source once; messages per second."""
    cmd = [SOURCE, "-s", str(args.sessions), "-m", str(args.messages), "-F", str(msg_file)]
    cmd += ["-f", f"app@{testing.SENDER_DOMAIN}", "-t", "someone@dest.test", f"127.0.0.1:{port}"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, timeout=600)
    return float(args.messages) / (time.perf_counter() - start)


class ReceiverTarget:
    """A Receiver process tree with its own configuration."""

    def __init__(self, directory: Path, redis_port: int, processes: int) -> None:
        self.port = free_port()
        directory.mkdir(parents=True)
        customer = testing.customer_config(directory, redis_port=redis_port)
        customer["receiver"]["bind"]["inet-port"] = self.port
        customer["receiver"]["prometheus"]["inet-port"] = free_port()
        customer["receiver"]["trusted-networks"] = ["127.0.0.0/8"]
        customer["receiver"]["processes"] = processes
        self.global_path, self.customer_path = testing.write_configs(directory, customer)
        self.processes = processes
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = directory / "receiver.log"

    def start(self) -> None:
        cmd = testing.service_command("receiver", self.global_path, self.customer_path, "--log-level", "WARNING")
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        wait_until(self._greets, timeout_s=30, what="the Receiver's 220 greeting")

    def _greets(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                return sock.recv(64).startswith(b"220")
        except OSError:
            return False

    def cpu_seconds(self) -> float:
        """CPU time used so far by the process tree (supervisor and workers)."""
        assert self.proc is not None
        pids = [self.proc.pid]
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        if children.exists():
            pids += [int(p) for p in children.read_text().split()]
        total = 0.0
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=10_240)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=0, help="Receiver worker processes (0 = one per core)")
    parser.add_argument("--no-single", action="store_true", help="skip the one-process Receiver comparison")
    args = parser.parse_args()
    require("smtp-source")
    require("postfix")
    cores = len(os.sched_getaffinity(0))
    processes = args.processes or cores
    print(
        f"receiver benchmark: smtp-source -s {args.sessions} -m {args.messages}, {args.size}-byte message "
        f"(-F), {cores} cores, load average {os.getloadavg()[0]:.2f} at start"
    )
    # Postfix daemons (user postfix) must be able to enter every directory above the queue.
    base = Path(tempfile.mkdtemp(prefix="bench-receiver-", dir="/tmp"))
    base.chmod(0o755)
    try:
        run(base, args, processes)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run(base: Path, args: argparse.Namespace, processes: int) -> None:
    msg_file = base / "message.eml"
    msg_file.write_bytes(message(args.size))
    redis_server = RedisProcess(base / "redis", appendfsync="always").start()
    client = redis.Redis(port=redis_server.port)
    postfix = PostfixInstance(
        base / "pf",
        smtpd_port=free_port(),
        nexthop=f"[127.0.0.1]:{free_port()}",  # never used: smtp deliveries are deferred
        main_cf={"defer_transports": "smtp"},
    )
    receivers = {f"Receiver, {processes} processes": ReceiverTarget(base / "rcv-n", redis_server.port, processes)}
    if not args.no_single and processes != 1:
        receivers["Receiver, 1 process"] = ReceiverTarget(base / "rcv-1", redis_server.port, 1)
    results: dict[str, list[float]] = {name: [] for name in [*receivers, "Postfix smtpd"]}
    cpu_notes: dict[int, str] = {}
    try:
        postfix.start()
        for target in receivers.values():
            target.start()

        def receiver_round(target: ReceiverTarget) -> Callable[[], float]:
            def measure() -> float:
                client.delete("IB-MAIL-QUEUE-P1")
                cpu = target.cpu_seconds()
                rate = smtp_source(target.port, args, msg_file)
                cpu = target.cpu_seconds() - cpu
                queued = client.xlen("IB-MAIL-QUEUE-P1")
                if queued != args.messages:
                    raise SystemExit(f"expected {args.messages} queued messages, found {queued}")
                per_msg = cpu / args.messages
                cpu_notes[id(target)] = f"  Receiver CPU {1000 * per_msg:.2f} ms/msg, {per_msg * rate:.2f} cores busy"
                return rate

            return measure

        def postfix_round() -> float:
            rate = smtp_source(postfix.smtpd_port, args, msg_file)
            subprocess.run(["postsuper", "-c", str(postfix.config_directory), "-d", "ALL"], capture_output=True)
            return rate

        plan: dict[str, Callable[[], float]] = {name: receiver_round(t) for name, t in receivers.items()}
        plan["Postfix smtpd"] = postfix_round
        for round_no in range(1, args.rounds + 1):
            for name, measure in plan.items():
                rate = measure()
                results[name].append(rate)
                note = cpu_notes.pop(id(receivers[name]), "") if name in receivers else ""
                print(f"  round {round_no}: {name:28} {rate:8,.0f} msg/s  (load {os.getloadavg()[0]:.2f}){note}")
    finally:
        for target in receivers.values():
            target.stop()
        postfix.stop()
        redis_server.stop()
    report(results, processes)


def report(results: dict[str, list[float]], processes: int) -> None:
    medians = {name: statistics.median(rates) for name, rates in results.items()}
    postfix = medians["Postfix smtpd"]
    print("medians:")
    for name, rate in medians.items():
        print(f"  {name:28} {rate:8,.0f} msg/s   {rate / postfix:5.2f}x Postfix smtpd")
    main_name = f"Receiver, {processes} processes"
    ratio = medians[main_name] / postfix
    verdict = "meets" if ratio >= 1.0 else "below"
    print(f"Receiver ({processes} processes, durable 250) / Postfix smtpd = {ratio:.2f}x ({verdict} the 1.0x goal)")
    if "Receiver, 1 process" in medians:
        print(f"{processes} processes / 1 process = {medians[main_name] / medians['Receiver, 1 process']:.2f}x")


if __name__ == "__main__":
    main()
