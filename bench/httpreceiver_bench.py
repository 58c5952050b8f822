"""HttpReceiver benchmark: POST /v1/mail/send with 10 KB messages, real gunicorn, real Redis.

Starts a private redis-server (AOF, ``appendfsync always`` unless ``--fsync everysec``) and the
``httpreceiver`` console script (gunicorn with the versioned gunicorn.conf.py) on free loopback
ports, then drives it with ``wrk`` (keep-alive connections, Lua body) when installed, else
with a bounded Python load generator (threads, keep-alive, fixed request count).

Prints requests/s, latency percentiles, the CPU time the server side (gunicorn + Redis) used
per request, and checks that every 200 answer left exactly one entry in the queue.  Next to it,
in the same run, two baselines, each with its own fresh Redis: a bare Flask view doing one XADD
served by the same worker model (gunicorn's ``asgi`` worker, the versioned settings, the body
read in the event loop and the view run by ``httpreceiver.bridge.WsgiBridge`` threads), and the
same view on gunicorn ``gthread`` workers (4 threads, how a bare Flask app is usually served).
The three servers run side by side and take turns for ``--rounds`` rounds (each goes first in
turn); medians and the ratios httpreceiver / baseline are printed, so a figure taken on a busy
machine can be read against floors measured in the same conditions.  Goals: >= 2,000 req/s and
>= 1.0x the bare Flask view.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis

from devtools import testing
from devtools.servers import RedisProcess, free_port, port_open, wait_until

GOAL = 2000


def message(size: int) -> bytes:
    head = (
        f"From: Sender <news@{testing.SENDER_DOMAIN}>\r\n"
        "To: Someone <someone@dest.test>\r\n"
        "Subject: benchmark\r\n"
        "X-Uuid: bench0001\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / os.sysconf("SC_CLK_TCK")


def server_pids(master: int, redis_pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout.split()
    return [master, redis_pid, *map(int, children)]


def run_wrk(url: str, body_file: Path, auth: str, args: argparse.Namespace) -> dict[str, float]:
    if not body_file.is_file() or body_file.stat().st_size == 0:
        raise FileNotFoundError(f"no request body in {body_file}")
    script = body_file.with_suffix(".lua")
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "message/rfc822"\n'
        f'wrk.headers["Authorization"] = "Basic {auth}"\n'
        f'local f = io.open("{body_file}", "rb"); wrk.body = f:read("*a"); f:close()\n'
    )
    cmd = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s", "--latency"]
    out = subprocess.run([*cmd, "-s", str(script), url], capture_output=True, text=True, check=True).stdout
    (body_file.parent / "wrk.out").write_text(out)
    figures: dict[str, float] = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    total = re.search(r"(\d+) requests in", out)
    figures["requests"] = float(total.group(1)) if total else 0.0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    figures["errors"] = float(non2xx.group(1)) if non2xx else 0.0
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if errors:
        figures["errors"] += sum(int(x) for x in errors.groups())
    for pct in ("50", "90", "99"):
        m = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)\b", out)
        if m:
            scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
            figures[f"p{pct}"] = float(m.group(1)) * scale
    return figures


def run_python(port: int, body: bytes, auth: str, args: argparse.Namespace) -> dict[str, float]:
    """Bounded fallback: ``--requests`` requests over ``--connections`` keep-alive threads."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    per_thread = args.requests // args.connections
    headers = {"Content-Type": "message/rfc822", "Authorization": f"Basic {auth}"}

    def client() -> None:
        nonlocal errors
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine: list[float] = []
        bad = 0
        for _ in range(per_thread):
            start = time.perf_counter()
            try:
                conn.request("POST", "/v1/mail/send", body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
                if resp.getheader("Connection", "").lower() == "close":
                    conn.close()
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
            mine.append((time.perf_counter() - start) * 1000)
            bad += not ok
        with lock:
            latencies.extend(mine)
            errors += bad

    threads = [threading.Thread(target=client) for _ in range(args.connections)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(len(latencies) * p / 100))]

    return {
        "rps": len(latencies) / elapsed,
        "requests": float(len(latencies)),
        "errors": float(errors),
        "p50": pct(50),
        "p90": pct(90),
        "p99": pct(99),
    }


BASELINE_APP = """
import os
import redis
from flask import Flask, request

client = redis.Redis(port=int(os.environ["BENCH_REDIS_PORT"]))
app = Flask("baseline")


@app.post("/v1/mail/send")
def send():
    client.xadd("BASELINE", {"raw": request.get_data()})
    return {"uuid": "x", "queue": "BASELINE"}


if os.environ.get("BENCH_BRIDGE"):
    # The same worker model as HttpReceiver: the asyncio worker reads the whole request, then
    # one of the bridge's threads runs the Flask view.
    from httpreceiver.bridge import WsgiBridge

    app = WsgiBridge(app, threads=int(os.environ["BENCH_BRIDGE"]), max_body=10_000_001, body_timeout_s=30.0)
"""

#: Contenders: HttpReceiver, and a bare Flask view doing one XADD served two ways.
CONTENDERS = {
    "httpreceiver": "httpreceiver (its gunicorn.conf.py)",
    "flask-same-model": "bare Flask + XADD, same worker model (asgi worker + WsgiBridge threads)",
    "flask-gthread": "bare Flask + XADD, gunicorn gthread workers (4 threads)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=10_240, help="message size in bytes")
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per round (wrk)")
    parser.add_argument("--requests", type=int, default=20_000, help="requests per round (Python generator)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the servers take turns in each")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of load per server before the rounds (wrk)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--workers", type=int, default=0, help="httpreceiver.workers (0 = one per core)")
    parser.add_argument(
        "--server-threads", type=int, default=4, help="httpreceiver.threads (and the same-model baseline's)"
    )
    parser.add_argument("--fsync", choices=["always", "everysec"], default="always")
    parser.add_argument("--client", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument(
        "--gunicorn-args", default="", help='extra gunicorn settings, e.g. "--threads 8" (GUNICORN_CMD_ARGS)'
    )
    parser.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the floors: a bare Flask view doing one XADD (same worker model, and gthread)",
    )
    args = parser.parse_args()
    args.client = args.client if args.client != "auto" else ("wrk" if shutil.which("wrk") else "python")

    with tempfile.TemporaryDirectory(prefix="bench-httpreceiver-") as tmp:
        root = Path(tmp)
        body = message(args.size)
        workers = args.workers or os.cpu_count() or 1
        print(
            f"httpreceiver benchmark: {len(body)}-byte messages, {workers} gunicorn workers, "
            f"{args.connections} connections, client {args.client}, redis appendfsync {args.fsync}, "
            + (f"gunicorn {args.gunicorn_args!r}, " if args.gunicorn_args else "")
            + f"{args.rounds} rounds taking turns, {os.cpu_count()} cores shared by client, server and Redis"
        )
        names = ["httpreceiver"] if args.no_baseline else list(CONTENDERS)
        servers = {}
        try:
            for name in names:
                servers[name] = Server(root / name, name, args)
            for server in servers.values():  # first requests: imports, password check, connections
                server.load(warmup=True)
            results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
            for round_ in range(1, args.rounds + 1):
                shift = (round_ - 1) % len(names)
                for name in names[shift:] + names[:shift]:  # each goes first in turn
                    results[name].append(servers[name].load())
                print(
                    f"  round {round_}: " + ", ".join(f"{name} {results[name][-1]['rps']:,.0f} req/s" for name in names)
                )
        finally:
            for server in servers.values():
                server.stop()
        medians = {name: statistics.median(r["rps"] for r in rounds) for name, rounds in results.items()}
        for name in names:
            report(CONTENDERS[name], results[name], args)
        ours = medians["httpreceiver"]
        print(f"  httpreceiver median: {ours:,.0f} req/s")
        for name in names[1:]:
            ratio = ours / medians[name]
            print(
                f"  httpreceiver / {name}: {ratio:.2f} ({ours:,.0f} vs {medians[name]:,.0f} req/s, medians; "
                f"{'meets' if ratio >= 1.0 else 'below'} the 1.0 goal)"
            )
        print(f"  result: {'goal met' if ours >= GOAL else 'below goal'} (goal >= {GOAL} req/s)")


class Server:
    """One contender: a fresh Redis and its gunicorn, kept running between rounds."""

    def __init__(self, root: Path, name: str, args: argparse.Namespace) -> None:
        root.mkdir()
        self.root, self.name, self.args = root, name, args
        # The body every request carries (wrk's Lua script reads it from this file).
        (root / "message.eml").write_bytes(message(args.size))
        self.redis = RedisProcess(root / "redis", appendfsync=args.fsync).start()
        self.proc: subprocess.Popen[bytes] | None = None
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        args, root = self.args, self.root
        self.api, self.metrics = free_port(), free_port()
        env = {**os.environ, "INBOXBOOSTER_LOG_LEVEL": os.environ.get("INBOXBOOSTER_LOG_LEVEL", "INFO")}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if args.gunicorn_args:
            env["GUNICORN_CMD_ARGS"] = args.gunicorn_args
        self.workers = args.workers or os.cpu_count() or 1
        if self.name != "httpreceiver":
            (root / "baseline.py").write_text(BASELINE_APP)
            settings = Path(__file__).resolve().parents[1] / "HttpReceiver" / "gunicorn.conf.py"
            # The versioned settings without their hooks (those drive the httpreceiver app object).
            conf = (
                "import runpy\n"
                f"_all = runpy.run_path({str(settings)!r})\n"
                "globals().update({k: v for k, v in _all.items() if not k.startswith('_') and not callable(v)})\n"
            )
            if self.name == "flask-gthread":
                conf += "worker_class = 'gthread'\nthreads = 4\n"
            else:
                env["BENCH_BRIDGE"] = str(args.server_threads)
            (root / "baseline_conf.py").write_text(conf)
            env["BENCH_REDIS_PORT"] = str(self.redis.port)
            command = [sys.executable, "-m", "gunicorn", "-c", str(root / "baseline_conf.py"), "--chdir", str(root),
                       "-w", str(self.workers), "-b", f"127.0.0.1:{self.api}", "baseline:app"]  # fmt: skip
            self.queue = "BASELINE"
        else:
            customer = testing.customer_config(
                root, redis_port=self.redis.port, ports={"httpreceiver": self.api, "httpreceiver-metrics": self.metrics}
            )
            customer["httpreceiver"]["workers"] = args.workers
            customer["httpreceiver"]["threads"] = args.server_threads
            global_ = testing.merge(testing.global_config(), {"reliable-queue": {"max-queue-length": 0}})
            gpath, cpath = testing.write_configs(root / "configs", customer, global_)
            command = testing.service_command("httpreceiver", gpath, cpath)
            self.queue = "IB-MAIL-QUEUE-P1"
        with (root / "server.log").open("wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_until(lambda: port_open("127.0.0.1", self.api), 20, what="the API port")
        wait_until(lambda: len(server_pids(self.proc.pid, 0)) - 2 >= self.workers, 20, what="all workers")  # type: ignore[union-attr]
        if self.name == "httpreceiver":
            wait_until(lambda: _ready(self.metrics), 20, what="httpreceiver /readyz")

    def load(self, *, warmup: bool = False) -> dict[str, float]:
        """One round of load; the figures (requests/s, latency, CPU, queued entries)."""
        assert self.proc is not None and self.redis.proc is not None
        warm = {"duration": self.args.warmup, "requests": self.args.requests // 10}
        args = argparse.Namespace(**{**vars(self.args), **warm}) if warmup else self.args
        auth = base64.b64encode(f"{testing.RECEIVER_USER}:{testing.RECEIVER_PASSWORD}".encode()).decode()
        pids = server_pids(self.proc.pid, self.redis.proc.pid)
        groups = {"workers": pids[2:], "master": pids[:1], "redis": pids[1:2]}
        client = redis.Redis(port=self.redis.port)
        queued_before = int(client.xlen(self.queue))
        before = {name: cpu_seconds(group) for name, group in groups.items()}
        wall_before = time.perf_counter()
        if args.client == "wrk":
            figures = run_wrk(f"http://127.0.0.1:{self.api}/v1/mail/send", self.root / "message.eml", auth, args)
        else:
            figures = run_python(self.api, message(args.size), auth, args)
        wall = time.perf_counter() - wall_before
        for name, group in groups.items():
            figures[f"cpu_{name}"] = cpu_seconds(group) - before[name]
        figures["wall"] = wall
        figures["queued"] = float(int(client.xlen(self.queue)) - queued_before)
        client.close()
        return figures

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
            self.proc = None
        self.redis.stop()


def report(name: str, rounds: list[dict[str, float]], args: argparse.Namespace) -> None:
    """Print one server's figures: medians over the rounds, totals for the counts."""

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rounds if key in r)

    requests = sum(r["requests"] for r in rounds)
    errors = sum(r["errors"] for r in rounds)
    queued = sum(r["queued"] for r in rounds)
    cpu_keys = [key for key in rounds[0] if key.startswith("cpu_")]
    cpu = {key.removeprefix("cpu_"): sum(r[key] for r in rounds) for key in cpu_keys}
    total = sum(cpu.values())
    wall = sum(r["wall"] for r in rounds)
    print(f"{name}:")
    print(f"  requests: {requests:.0f} ({errors:.0f} errors), queued entries: {queued:.0f}")
    print(f"  throughput: {med('rps'):.0f} requests/s (median of {len(rounds)} rounds)")
    print(
        "  latency ms (medians): "
        + ", ".join(f"p{p} {med(f'p{p}'):.2f}" for p in ("50", "90", "99") if f"p{p}" in rounds[0])
    )
    print(
        f"  server CPU: {total / max(queued, 1.0) * 1000:.3f} ms per request ("
        + ", ".join(f"{key} {value / max(queued, 1.0) * 1000:.3f}" for key, value in cpu.items())
        + f"), {total / wall * 100:.0f}% of one core"
    )
    ok = requests - errors
    if abs(queued - ok) > args.connections * len(rounds):
        print(f"  WARNING: {ok:.0f} successful answers but {queued:.0f} queued entries")


def _ready(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("GET", "/readyz")
        return conn.getresponse().status == 200
    except OSError:
        return False


if __name__ == "__main__":
    main()
