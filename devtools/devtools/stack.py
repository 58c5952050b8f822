"""The whole platform on one machine: Redis, Postfix and the seven services on loopback.

``mailer-stack up`` (what ``./mailer up`` runs) creates ``run/`` on first use -- configuration
files with a fresh DKIM key, a state directory per service, logs -- then starts, in the order of
the original README's deployment section:

1. Redis (AOF, ``appendfsync always``; one ACL user per service, :mod:`common.redisacl`, each
   service logging in with its own generated password) and its sidecar exporter,
2. the demo peers: an SMTP sink that plays "the internet" and a webhook receiver that records
   every event in ``run/events.jsonl``,
3. BackData, MxServer, PostfixLog (which runs a private Postfix relaying only to the sink),
   Transformer, Receiver and HttpReceiver.

Ctrl-C (or ``mailer-stack down``) stops them in the termination order: Receiver/HttpReceiver,
Transformer, PostfixLog (which hands mail still in Postfix back to Redis), BackData, MxServer,
Redis.  Nothing can leave the machine unless ``postfixlog.sandbox.enabled`` is set to false in
``run/configs/inboxbooster-mailer-customer.yaml``.

:class:`Stack` is the same thing as a library, used by the end-to-end tests and the benchmarks
(free ports, a temporary directory, kill/restart of single services).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common import logs, redisacl
from common.config import load_config
from common.version import __version__
from devtools import testing
from devtools.redisha import LocalRedisHA
from devtools.servers import RedisProcess, free_port, port_open, wait_until

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

#: Fixed loopback ports of ``./mailer up`` (tests and benchmarks use free ports instead).
DEFAULT_PORTS: Mapping[str, int] = {
    "redis": 6390,
    "redis-metrics": 9107,
    "sink": 2526,
    "webhook": 8099,
    "postfix": 10025,
    "mxserver": 2525,
    "mxserver-metrics": 9105,
    "receiver": 2587,
    "receiver-metrics": 9101,
    "httpreceiver": 8080,
    "httpreceiver-metrics": 9102,
    "transformer-metrics": 9103,
    "postfixlog-metrics": 9104,
    "backdata-metrics": 9106,
}

#: Shifts every port of ``./mailer up`` by N (a second stack, or ports that are taken).
PORT_OFFSET_VARIABLE = "MAILER_PORT_OFFSET"


def default_ports() -> dict[str, int]:
    """:data:`DEFAULT_PORTS`, each shifted by ``$MAILER_PORT_OFFSET`` (0 when unset)."""
    text = os.environ.get(PORT_OFFSET_VARIABLE, "").strip() or "0"
    try:
        offset = int(text)
    except ValueError:
        raise RuntimeError(f"{PORT_OFFSET_VARIABLE}={text!r} is not a whole number") from None
    ports = {name: port + offset for name, port in DEFAULT_PORTS.items()}
    if not all(1024 <= port <= 65535 for port in ports.values()):
        raise RuntimeError(f"{PORT_OFFSET_VARIABLE}={offset} puts ports outside 1024-65535")
    return ports


#: Start order (the original README's deployment order); stop order is STOP_ORDER.
START_ORDER = (
    "redis-sidecar",
    "backdata",
    "mxserver",
    "postfixlog",
    "transformer",
    "receiver",
    "httpreceiver",
)
STOP_ORDER = (
    "receiver",
    "httpreceiver",
    "transformer",
    "postfixlog",
    "backdata",
    "mxserver",
    "redis-sidecar",
)


@dataclass(frozen=True)
class ServiceSpec:
    """How to run one service of the stack."""

    name: str
    script: str
    args: tuple[str, ...] = ()
    metrics_key: str | None = None
    grace_s: float = 30.0

    @property
    def executable(self) -> Path:
        """The service's console script in this environment."""
        return BIN / self.script


SERVICES: Mapping[str, ServiceSpec] = {
    "redis-sidecar": ServiceSpec("redis-sidecar", "redis-sidecar", ("exporter",), "redis-metrics", 10),
    "backdata": ServiceSpec("backdata", "backdata", (), "backdata-metrics", 30),
    "mxserver": ServiceSpec("mxserver", "mxserver", (), "mxserver-metrics", 30),
    "postfixlog": ServiceSpec("postfixlog", "postfixlog", (), "postfixlog-metrics", 90),
    "transformer": ServiceSpec("transformer", "transformer", (), "transformer-metrics", 30),
    "receiver": ServiceSpec("receiver", "receiver", (), "receiver-metrics", 30),
    "httpreceiver": ServiceSpec("httpreceiver", "httpreceiver", (), "httpreceiver-metrics", 30),
}


def stack_customer_config(directory: Path, ports: Mapping[str, int]) -> dict[str, Any]:
    """The customer file of a local stack: loopback ports, sandboxed Postfix, a fresh DKIM key."""
    config = testing.customer_config(
        directory,
        redis_port=ports["redis"],
        ports=ports,
        webhook_url=f"http://127.0.0.1:{ports['webhook']}/events",
    )
    # A key of its own (the test helper caches one per process).
    from common.dkimkeys import generate_rsa_pem

    key = directory / f"dkim-{testing.SENDER_DOMAIN}.pem"
    key.write_bytes(generate_rsa_pem(2048))
    # Least privilege as in production: every service logs in as its own Redis user.
    users = testing.redis_users(redisacl.SERVICES)
    return testing.merge(
        config,
        {
            **users,
            "common-config": {"address-secret": os.urandom(32).hex()},
            "transformer": {
                **users["transformer"],
                "unsubscribe-url": f"http://127.0.0.1:{ports['httpreceiver']}/unsubscribe/{{{{token}}}}",
            },
            "mxserver": {**users["mxserver"], "eml-directory": str(directory.parent / "state" / "mxserver-eml")},
            "postfixlog": {**users["postfixlog"], "instance-directory": str(directory.parent / "state" / "postfix")},
            "redis": {"prometheus": {"inet-interface": "127.0.0.1", "inet-port": ports["redis-metrics"]}},
        },
    )


@dataclass
class Stack:
    """A local stack rooted at ``run_dir``."""

    run_dir: Path
    ports: dict[str, int] = field(default_factory=dict)
    services: tuple[str, ...] = START_ORDER
    peers: bool = True
    customer_override: Mapping[str, Any] = field(default_factory=dict)
    echo: Callable[[str], None] = lambda line: None
    #: Above 0: Redis as a primary with this many replicas and three sentinels
    #: (:class:`devtools.redisha.LocalRedisHA`, the deploy/ha layout; or pass ``ha``); needs a new ``run_dir``.
    ha_replicas: int = 0
    redis: RedisProcess | None = None
    ha: LocalRedisHA | None = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    sink: Any = None
    webhook: Any = None

    def __post_init__(self) -> None:
        # Absolute: the files written into the configuration (the DKIM key's path) are read
        # relative to the configuration file's directory, not to where `./mailer up` ran.
        self.run_dir = self.run_dir.absolute()

    # -- layout --------------------------------------------------------------------------

    @property
    def config_dir(self) -> Path:
        """Where both YAML files and the DKIM key live."""
        return self.run_dir / "configs"

    @property
    def global_file(self) -> Path:
        """The global configuration file."""
        return self.config_dir / "inboxbooster-mailer-global.yaml"

    @property
    def customer_file(self) -> Path:
        """The customer configuration file."""
        return self.config_dir / "inboxbooster-mailer-customer.yaml"

    @property
    def log_dir(self) -> Path:
        """One log file per service."""
        return self.run_dir / "logs"

    @property
    def events_file(self) -> Path:
        """Events received by the demo webhook (JSON lines)."""
        return self.run_dir / "events.jsonl"

    @property
    def sink_dir(self) -> Path:
        """Messages accepted by the demo sink ("the internet")."""
        return self.run_dir / "sink"

    def prepare(self) -> None:
        """Create ``run_dir`` with configuration files unless they exist (user edits are kept)."""
        for sub in ("configs", "logs", "state", "sink"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        _make_traversable(self.run_dir / "state")
        ports_file = self.run_dir / "ports.json"
        if ports_file.exists():
            self.ports = {**json.loads(ports_file.read_text()), **self.ports}
            if os.environ.get(PORT_OFFSET_VARIABLE) and self.ports != default_ports():
                raise RuntimeError(
                    f"{self.run_dir} was set up with other ports ({ports_file}); use another --run-dir, "
                    f"or remove {ports_file.name} and configs/ there to set it up again"
                )
        if not self.ports:
            self.ports = default_ports()
        override: Mapping[str, Any] = self.customer_override
        if self.ha is None and self.ha_replicas:
            self.ha = LocalRedisHA(self.run_dir / "state" / "redis-ha", replicas=self.ha_replicas)
        if self.ha is not None:
            if self.customer_file.exists():
                raise RuntimeError(f"{self.run_dir} has a configuration already; Redis with sentinels needs a new one")
            self.ports["redis"] = self.ha.node_ports[0]
            override = testing.merge(self._ha_override(self.ha), override)
        ports_file.write_text(json.dumps(self.ports, indent=2) + "\n")
        if not self.customer_file.exists():
            customer = testing.merge(stack_customer_config(self.config_dir, self.ports), override)
            testing.write_configs(self.config_dir, customer)
            self.echo(f"wrote configuration to {self.config_dir}")

    @staticmethod
    def _ha_override(ha: LocalRedisHA) -> dict[str, Any]:
        """Every service finds the primary through the sentinels; the exporter watches node 0."""
        block = ha.redis_block()
        return {
            "common-config": {"redis": {"sentinel": block["sentinel"]}},
            "redis": {"reliable-queue": {"redis": {"password": ha.admin_password, "port": ha.node_ports[0]}}},
        }

    def customer(self) -> dict[str, Any]:
        """The customer file as a dict."""
        data: dict[str, Any] = yaml.safe_load(self.customer_file.read_text())
        return data

    # -- running -------------------------------------------------------------------------

    def start(self) -> None:
        """Start everything in the deployment order; raises if something does not come up."""
        self.prepare()
        busy = [f"{name} ({port})" for name, port in self.ports.items() if port_open("127.0.0.1", port)]
        if busy:
            raise RuntimeError(f"ports already in use: {', '.join(busy)} (is another stack running?)")
        self.echo(f"starting Redis on 127.0.0.1:{self.ports['redis']}")
        try:
            users = redisacl.user_lines(load_config(self.global_file, self.customer_file))
            if self.ha is not None:
                self.ha.users = users
                self.ha.start()
                self.echo(f"Redis: primary, {self.ha.replicas} replica(s), sentinels on {self.ha.sentinel_ports}")
            else:
                self.redis = RedisProcess(self.run_dir / "state" / "redis", self.ports["redis"], users=users).start()
            if self.peers:
                self._start_peers()
            for name in self.services:
                self.start_service(name)
        except BaseException:
            self.stop()  # never leave half a stack running
            raise

    def _start_peers(self) -> None:
        from devtools.sink import Sink
        from devtools.webhook import WebhookReceiver

        # With a "sink-7bit" port the sink also plays an old receiver there (no 8BITMIME, no
        # SMTPUTF8); point postfixlog.sandbox.nexthop at it to send everything that way.
        seven_bit = self.ports.get("sink-7bit")
        self.sink = Sink("127.0.0.1", self.ports["sink"], maildir=self.sink_dir, seven_bit_port=seven_bit).start()
        self.echo(f"SMTP sink (the internet) on 127.0.0.1:{self.ports['sink']}, mail in {self.sink_dir}")
        if seven_bit is not None:
            self.echo(f"SMTP sink without 8BITMIME/SMTPUTF8 on 127.0.0.1:{seven_bit}")
        self.webhook = WebhookReceiver("127.0.0.1", self.ports["webhook"], out=self.events_file, validate=True).start()
        self.echo(f"webhook receiver on {self.webhook.url}, events in {self.events_file}")

    def start_service(self, name: str, timeout_s: float = 60.0) -> None:
        """Start one service and wait until it is ready."""
        spec = SERVICES[name]
        if not spec.executable.exists():
            self.echo(f"{name}: not installed in this environment; skipped")
            return
        argv = [
            str(spec.executable),
            "--global-config-file",
            str(self.global_file),
            "--customer-config-file",
            str(self.customer_file),
            *spec.args,
        ]
        logfile = (self.log_dir / f"{name}.log").open("ab")
        env = {**os.environ, "INBOXBOOSTER_CONSUMER_NAME": f"local-{name}"}
        self.procs[name] = subprocess.Popen(
            argv,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            cwd=self.run_dir / "state",
            env=env,
            start_new_session=True,
        )
        logfile.close()
        try:
            wait_until(lambda: self._ready(name), timeout_s=timeout_s, interval_s=0.1, what=f"{name} to be ready")
        except TimeoutError:
            raise RuntimeError(f"{name} did not become ready; last log lines:\n{self.log_tail(name)}") from None
        self.echo(f"{name} ready (pid {self.procs[name].pid}, log {self.log_dir / (name + '.log')})")

    def _ready(self, name: str) -> bool:
        proc = self.procs[name]
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}; last log lines:\n{self.log_tail(name)}")
        spec = SERVICES[name]
        if spec.metrics_key is None:
            return True
        url = f"http://127.0.0.1:{self.ports[spec.metrics_key]}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, name: str, lines: int = 30) -> str:
        """The last lines of a service's log."""
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop_service(self, name: str) -> int | None:
        """SIGTERM one service and wait for it (SIGKILL after its grace period)."""
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(SERVICES[name].grace_s)
        except subprocess.TimeoutExpired:
            self.echo(f"{name} did not stop within {SERVICES[name].grace_s:.0f}s; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()

    def kill_service(self, name: str) -> None:
        """SIGKILL one service (and its children, e.g. Postfix under PostfixLog)."""
        proc = self.procs.pop(name, None)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        """Stop everything in the termination order."""
        for name in STOP_ORDER:
            if name in self.procs:
                self.echo(f"stopping {name}")
                code = self.stop_service(name)
                if code not in (0, None, -signal.SIGTERM):
                    self.echo(f"{name} exited with {code}")
        for peer in (self.webhook, self.sink):
            if peer is not None:
                peer.stop()
        self.webhook = self.sink = None
        if self.redis is not None:
            self.echo("stopping Redis")
            self.redis.stop()
            self.redis = None
        if self.ha is not None:
            self.echo("stopping Redis and its sentinels")
            self.ha.stop()

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _make_traversable(path: Path) -> None:
    """Let Postfix' unprivileged user reach its queue below ``path``.

    pytest's temporary directories are private (mode 0700); only search permission is added.
    """
    for directory in (path, *path.parents):
        info = directory.stat()
        if info.st_uid == os.getuid() and not info.st_mode & 0o001:
            directory.chmod(info.st_mode | 0o011)


def free_ports() -> dict[str, int]:
    """A port map with a free port for every entry (for tests and benchmarks)."""
    return {name: free_port() for name in DEFAULT_PORTS}


# -- command line ---------------------------------------------------------------------------


def _banner(stack: Stack) -> str:
    p = stack.ports
    user, password = testing.RECEIVER_USER, testing.RECEIVER_PASSWORD
    sender = f"demo@{testing.SENDER_DOMAIN}"
    message = rf"From: {sender}\r\nTo: bounce1@dest.test\r\nX-Uuid: hello2\r\nSubject: hi\r\n\r\nbody\r\n"
    metrics = ", ".join(
        f"{name} {p[name + '-metrics']}"
        for name in ("receiver", "httpreceiver", "transformer", "postfixlog", "mxserver", "backdata", "redis")
    )
    return f"""
The stack is running.  Send a first mail:

  swaks --server 127.0.0.1:{p["receiver"]} --tls --auth-user {user} --auth-password '{password}' \\
        --from {sender} --to someone@dest.test --header 'X-Uuid: hello1' --header 'Subject: hello'

  curl -u '{user}:{password}' -H 'Content-Type: message/rfc822' \\
       --data-binary $'{message}' http://127.0.0.1:{p["httpreceiver"]}/v1/mail/send

Watch it:
  events   tail -f {stack.events_file}
  mail     ls {stack.sink_dir}   (recipients bounce*, defer*, full*, block* get scripted failures)
  logs     tail -f {stack.log_dir}/*.log
  metrics  curl -s 127.0.0.1:<port>/metrics   ({metrics})
  MX       port {p["mxserver"]}: asynchronous bounces, ARF reports and unsubscribe mails

Configuration: {stack.customer_file}
Ctrl-C (or ./mailer down) stops everything in the termination order.
"""


def main(argv: list[str] | None = None) -> int:
    """``mailer-stack up|down|status``."""
    parser = argparse.ArgumentParser(
        prog="mailer-stack",
        description="Run the whole platform locally",
        epilog=f"{PORT_OFFSET_VARIABLE}=N shifts every port by N (for a new --run-dir).",
    )
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--run-dir", type=Path, default=REPO / "run")
    args = parser.parse_args(argv)
    logs.setup("stack")
    pid_file = args.run_dir / "stack.pid"

    def echo(line: str) -> None:
        sys.stdout.write(f"==> {line}\n")
        sys.stdout.flush()

    if args.command == "down":
        return _down(pid_file, echo)
    if args.command == "status":
        return _status(args.run_dir, pid_file, echo)
    stack = Stack(args.run_dir, echo=echo)
    stop = {"requested": False}

    def on_signal(signum: int, _frame: object) -> None:
        stop["requested"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    started = time.monotonic()
    try:
        stack.start()
        pid_file.write_text(str(os.getpid()))
        echo(f"all services up in {time.monotonic() - started:.1f}s")
        sys.stdout.write(_banner(stack))
        sys.stdout.flush()
        while not stop["requested"]:
            for name, proc in list(stack.procs.items()):
                if proc.poll() is not None:
                    echo(f"{name} exited with {proc.returncode}; last log lines:\n{stack.log_tail(name)}")
                    stop["requested"] = True
            time.sleep(0.5)
    except (RuntimeError, TimeoutError, FileNotFoundError) as exc:
        echo(f"cannot start the stack: {exc}")
        stack.stop()
        return 1
    finally:
        if stop["requested"]:
            echo("stopping in the termination order")
            stack.stop()
        pid_file.unlink(missing_ok=True)
    return 0


def _down(pid_file: Path, echo: Callable[[str], None]) -> int:
    if not pid_file.exists():
        echo("no stack is running (no run/stack.pid)")
        return 0
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pid_file.unlink(missing_ok=True)
        echo("the stack was not running")
        return 0
    echo(f"asked the stack (pid {pid}) to stop")
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: not pid_file.exists(), timeout_s=180, interval_s=0.5, what="stack to stop")
    return 0


def _status(run_dir: Path, pid_file: Path, echo: Callable[[str], None]) -> int:
    ports_file = run_dir / "ports.json"
    ports = json.loads(ports_file.read_text()) if ports_file.exists() else default_ports()
    echo(f"stack pid file: {'present' if pid_file.exists() else 'absent'}")
    for name, port in ports.items():
        echo(f"{name:22s} 127.0.0.1:{port:<6d} {'listening' if port_open('127.0.0.1', port) else '-'}")
    return 0


@contextlib.contextmanager
def running_stack(run_dir: Path, **kwargs: Any) -> Iterator[Stack]:
    """A started :class:`Stack` with free ports, stopped on exit (tests and benchmarks)."""
    stack = Stack(run_dir, ports=free_ports(), **kwargs)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


if __name__ == "__main__":
    raise SystemExit(main())
