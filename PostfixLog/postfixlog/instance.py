"""A private Postfix instance: render its configuration, start, supervise and stop it.

One directory holds everything of an instance::

    <directory>/etc/main.cf, master.cf, transport   rendered from postfixlog/postfix/*.in and the
                                                    shaping rules (provider transports)
    <directory>/etc/header_checks, body_header_checks  routing header -> provider transport
    <directory>/queue/                              queue_directory (incoming, active, deferred…)
    <directory>/data/                               data_directory (owned by postfix)
    <directory>/log/postfix.log                     maillog_file (what the log follower reads)

Postfix listens on ``127.0.0.1:<smtpd_port>`` only and trusts loopback only: it relays for
anyone who can reach it.  With a ``nexthop`` (sandbox) *every* delivery goes to that host --
relayhost, default and relay transports all point at it, transport maps are off and DNS is
never used -- so nothing can reach the internet by accident.

The master process runs in the foreground as a child (``master -c DIR -s``), so SIGTERM to it
stops Postfix cleanly; it also receives SIGTERM when the process that started it dies
(``PR_SET_PDEATHSIG``), so a killed PostfixLog never leaves an orphaned Postfix behind.

Used by PostfixLog itself, by the benchmarks of other services and by the local stack.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from string import Template
from typing import Any, Final

from common.config.postfixlog import MANAGED_PARAMETERS, PostfixLogSection, main_cf_problems
from postfixlog.routing import ROUTE_HEADER
from postfixlog.rules import Rules, render_body_header_checks, render_header_checks, render_main_cf, render_master_cf

__all__ = ["MANAGED_PARAMETERS", "PostfixError", "PostfixInstance", "check_overrides"]

log = logging.getLogger(__name__)

TEMPLATES: Final = Path(__file__).with_name("postfix")
SBIN: Final = Path("/usr/sbin")
DAEMON_DIRECTORY: Final = Path("/usr/lib/postfix/sbin")
LOOPBACK: Final = "127.0.0.1"

#: Parameters the sandbox forces so that every delivery goes to the sink.
SANDBOX_PARAMETERS: Final = (
    "relayhost",
    "default_transport",
    "relay_transport",
    "transport_maps",
    "sender_dependent_relayhost_maps",
    "sender_dependent_default_transport_maps",
    "smtp_fallback_relay",
    "smtp_dns_support_level",
    "default_filter_nexthop",
)

#: Postfix queues as named by ``postqueue -j`` and the queue directory.
QUEUES: Final = ("incoming", "active", "deferred", "corrupt", "hold", "maildrop")

PR_SET_PDEATHSIG: Final = 1
#: sun_path holds 108 bytes; Postfix adds service names under queue/private/.
MAX_SOCKET_PATH: Final = 100


class PostfixError(RuntimeError):
    """Postfix could not be configured, started, queried or stopped."""


def parameter_value(value: str | int | bool) -> str:
    """main.cf spelling of a configured value (YAML booleans become yes/no)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def check_overrides(main_cf: Mapping[str, str | int | bool]) -> list[str]:
    """Problems with main.cf overrides (one line each); empty when they are acceptable."""
    return main_cf_problems(dict(main_cf))


def _set_parameter(lines: list[str], key: str, value: str) -> None:
    """Replace ``key = …`` in main.cf lines, or append it."""
    pattern = re.compile(rf"^{re.escape(key)}\s*=")
    for i, line in enumerate(lines):
        if pattern.match(line):
            lines[i] = f"{key} = {value}"
            return
    lines.append(f"{key} = {value}")


def _die_with_parent() -> None:
    """Ask the kernel to SIGTERM the child when the thread that started it dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _run(args: list[str], *, what: str, timeout_s: float = 60.0, tty: bool = False) -> str:
    """Run a Postfix tool; its output, or PostfixError with the output.

    With ``tty`` the command runs under ``script`` because the Postfix CLI only prints its
    errors when stderr is a terminal.
    """
    use_script = tty and shutil.which("script") is not None
    cmd = ["script", "-qec", " ".join(_quote(a) for a in args), "/dev/null"] if use_script else args
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PostfixError(f"{what}: {exc}") from exc
    output = (proc.stdout + proc.stderr).decode(errors="replace").replace("\r\n", "\n").strip()
    if use_script and proc.returncode != 0 and "pseudo-terminal" in output:
        return _run(args, what=what, timeout_s=timeout_s)  # no pty here: run it plainly
    if proc.returncode != 0:
        raise PostfixError(f"{what} failed (exit {proc.returncode}): {output or 'no output'}")
    return output


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


class PostfixInstance:
    """One private Postfix: configuration, process and queue of ``directory``."""

    def __init__(
        self,
        directory: Path,
        *,
        smtpd_port: int,
        nexthop: str | None = None,
        main_cf: Mapping[str, str | int | bool] | None = None,
        myhostname: str = "mta.example.test",
        dns_server: str | None = None,
        rules: Rules | None = None,
    ) -> None:
        problems = check_overrides(main_cf or {})
        if problems:
            raise ValueError("invalid main.cf overrides: " + "; ".join(problems))
        self.directory = Path(directory).absolute()
        self.smtpd_port = smtpd_port
        self.nexthop = nexthop
        self.main_cf = dict(main_cf or {})
        self.myhostname = str(self.main_cf.pop("myhostname", myhostname))
        self.mailname = str(self.main_cf.pop("mailname", "")) or None
        #: Tests: a loopback DNS server Postfix uses instead of /etc/resolv.conf (the master
        #: runs in its own mount namespace with a private resolv.conf bound over the real one).
        self.dns_server = dns_server
        #: Shaping rules rendered into provider transports (None: no provider transports).
        self.rules = rules
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def from_config(cls, section: PostfixLogSection, rules: Rules | None = None) -> PostfixInstance:
        """The instance described by the customer file's ``postfixlog`` section."""
        replacer = section.string_replacer
        return cls(
            section.instance_directory,
            smtpd_port=replacer.master_cf.smtpd_port,
            nexthop=section.sandbox.nexthop if section.sandbox.enabled else None,
            main_cf=replacer.main_cf,
            rules=rules,
        )

    # -- paths -----------------------------------------------------------------------------

    @property
    def config_directory(self) -> Path:
        """``-c`` directory of every Postfix command (main.cf, master.cf)."""
        return self.directory / "etc"

    @property
    def queue_directory(self) -> Path:
        """Postfix' queue_directory."""
        return self.directory / "queue"

    @property
    def data_directory(self) -> Path:
        """Postfix' data_directory (TLS session cache)."""
        return self.directory / "data"

    @property
    def log_directory(self) -> Path:
        """Directory of the maillog file (and of the master's stderr)."""
        return self.directory / "log"

    @property
    def log_path(self) -> Path:
        """The maillog_file the log follower reads."""
        return self.log_directory / "postfix.log"

    @property
    def sandbox(self) -> bool:
        """True when every delivery goes to ``nexthop``."""
        return self.nexthop is not None

    # -- configuration ---------------------------------------------------------------------

    def main_cf_text(self) -> str:
        """The rendered main.cf."""
        sandbox = self.nexthop is not None
        values = {
            "queue_directory": str(self.queue_directory),
            "data_directory": str(self.data_directory),
            "log_directory": str(self.log_directory),
            "maillog_file": str(self.log_path),
            "myhostname": self.myhostname,
            "myorigin": self.mailname or "$myhostname",
            "transport_maps": f"texthash:{self.config_directory / 'transport'}",
            "header_checks": str(self.config_directory / "header_checks"),
            "body_header_checks": str(self.config_directory / "body_header_checks"),
        }
        text = Template((TEMPLATES / "main.cf.in").read_text()).substitute(values)
        lines = text.splitlines()
        transports = render_main_cf(self.rules) if self.rules is not None else ""
        if transports:
            lines += [
                "",
                "# -- provider transports (postfixlog/shaping.yaml; postfixlog.rules)",
                *transports.splitlines(),
            ]
        if self.main_cf:
            lines += ["", "# -- postfixlog.string-replacer.main-cf overrides"]
        for key, value in self.main_cf.items():
            if sandbox and key in SANDBOX_PARAMETERS:
                log.warning("main.cf override %s ignored: the sandbox routes every delivery", key)
                continue
            _set_parameter(lines, key, parameter_value(value))
        if not sandbox and self.main_cf.get("relayhost") and "default_filter_nexthop" not in self.main_cf:
            # Mail routed to a provider transport (a FILTER) goes to the relay host as well.
            _set_parameter(lines, "default_filter_nexthop", parameter_value(self.main_cf["relayhost"]))
        if sandbox:
            lines += ["", f"# -- sandbox: every delivery goes to {self.nexthop}, nothing leaves"]
            forced = {
                "relayhost": str(self.nexthop),
                "default_transport": f"smtp:{self.nexthop}",
                "relay_transport": f"smtp:{self.nexthop}",
                "transport_maps": "",
                "sender_dependent_relayhost_maps": "",
                "sender_dependent_default_transport_maps": "",
                "smtp_fallback_relay": "",
                "smtp_dns_support_level": "disabled",
                # Where the SMTPUTF8 transport (header_checks FILTER in main.cf.in) delivers.
                "default_filter_nexthop": str(self.nexthop),
            }
            for key, value in forced.items():
                _set_parameter(lines, key, value)
        return "\n".join(lines) + "\n"

    def master_cf_text(self) -> str:
        """The rendered master.cf."""
        text = Template((TEMPLATES / "master.cf.in").read_text()).substitute(
            smtpd_listen=f"{LOOPBACK}:{self.smtpd_port}"
        )
        return text + (render_master_cf(self.rules) if self.rules is not None else "")

    def header_checks_text(self) -> str:
        """header_checks: the routing header to provider transports, 8-bit headers to smtputf8."""
        rules = self.rules
        if rules is None:
            return render_body_header_checks()
        return render_header_checks(rules, ROUTE_HEADER)

    def render(self) -> None:
        """Write etc/ and create the directories (data/ owned by postfix).

        Raises:
            PostfixError: the directory cannot work as a Postfix instance.
        """
        self._check_directory()
        for path in (self.config_directory, self.queue_directory, self.data_directory, self.log_directory):
            path.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o755)
        self._write(self.config_directory / "main.cf", self.main_cf_text())
        self._write(self.config_directory / "master.cf", self.master_cf_text())
        self._write(self.config_directory / "transport", (TEMPLATES / "transport").read_text())
        self._write(self.config_directory / "header_checks", self.header_checks_text())
        self._write(self.config_directory / "body_header_checks", render_body_header_checks())
        with contextlib.suppress(LookupError, PermissionError):
            shutil.chown(self.data_directory, "postfix", "postfix")
        self._own_log_file()

    def _own_log_file(self) -> None:
        """Let the postfix user append to the log file.

        With Postfix stopped, postsuper (running as postfix) writes its lines to it itself.
        """
        self.log_path.touch(exist_ok=True)
        with contextlib.suppress(LookupError, PermissionError):
            shutil.chown(self.log_path, "postfix", "postfix")

    def _check_directory(self) -> None:
        """Postfix daemons run as user postfix and talk over UNIX sockets in the queue directory."""
        socket_path = self.queue_directory / "private" / "proxywrite"
        if len(str(socket_path).encode()) > MAX_SOCKET_PATH:
            raise PostfixError(
                f"instance directory {self.directory} is too long: Postfix' UNIX socket paths "
                f"must stay under {MAX_SOCKET_PATH} bytes"
            )
        for parent in self.directory.parents:
            try:
                mode = parent.stat().st_mode
            except FileNotFoundError:
                continue
            if not mode & stat.S_IXOTH:
                raise PostfixError(
                    f"instance directory {self.directory}: user postfix cannot enter {parent} "
                    f"(mode {stat.filemode(mode)}); choose a directory every user can traverse"
                )

    @staticmethod
    def _write(path: Path, text: str) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)

    # -- process ---------------------------------------------------------------------------

    def start(self, timeout_s: float = 30.0, *, check: bool = True) -> None:
        """Render, check (creates the queue directories), run master, wait until smtpd answers.

        ``check=False`` skips ``postfix check`` when the caller just ran :meth:`check`.

        Raises:
            PostfixError: the configuration is refused or Postfix does not come up.
        """
        self.render()
        self.stop_stale(timeout_s)
        if check:
            self.check()
        stderr_path = self.log_directory / "master.stderr"
        with stderr_path.open("ab") as stderr:
            self.proc = subprocess.Popen(
                self._master_command(),
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                preexec_fn=_die_with_parent,  # only prctl: safe between fork and exec
            )
        deadline = time.monotonic() + timeout_s
        while not self.answers():
            if self.proc.poll() is not None:
                raise PostfixError(f"postfix master exited with {self.proc.returncode}: {self._diagnostics()}")
            if time.monotonic() > deadline:
                self.stop()
                raise PostfixError(f"postfix did not answer within {timeout_s:.0f}s: {self._diagnostics()}")
            time.sleep(0.05)
        log.info(
            "postfix %s answers on %s:%d (pid %d%s)",
            self.directory,
            LOOPBACK,
            self.smtpd_port,
            self.proc.pid,
            f", sandbox -> {self.nexthop}" if self.nexthop else "",
        )

    def _master_command(self) -> list[str]:
        master = [str(DAEMON_DIRECTORY / "master"), "-c", str(self.config_directory), "-s"]
        if self.dns_server is None:
            return master
        resolv_conf = self.config_directory / "resolv.conf"
        resolv_conf.write_text(f"nameserver {self.dns_server}\noptions attempts:1 timeout:2\n")
        bind = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", bind, str(resolv_conf), *master]

    def check(self) -> None:
        """``postfix check``: validates the configuration, creates queue directories.

        Raises:
            PostfixError: with Postfix' own complaint.
        """
        output = _run(
            [str(SBIN / "postfix"), "-c", str(self.config_directory), "check"],
            what="postfix check",
            tty=True,
        )
        for line in output.splitlines():
            if line.strip():
                log.warning("postfix check: %s", line.strip())

    def answers(self) -> bool:
        """True when smtpd accepts a TCP connection and greets with 220."""
        try:
            with socket.create_connection((LOOPBACK, self.smtpd_port), timeout=1.0) as sock:
                greeting = sock.recv(512)
                with contextlib.suppress(OSError):
                    sock.sendall(b"QUIT\r\n")
                return greeting.startswith(b"220")
        except OSError:
            return False

    @property
    def running(self) -> bool:
        """True while the master process we started is alive."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the master we started."""
        return self.proc.pid if self.proc is not None else None

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the master and wait for it (then SIGKILL if it hangs)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.error("postfix master did not stop within %.0fs; killing it", timeout_s)
                self.proc.kill()
                self.proc.wait()
        self._wait_children_gone(timeout_s)
        log.info("postfix %s stopped", self.directory)

    def stop_stale(self, timeout_s: float = 30.0) -> None:
        """Stop a master left running on this instance by an earlier process."""
        pid = self._pidfile_pid()
        if pid is None or (self.proc is not None and self.proc.pid == pid):
            return
        log.warning("stopping a postfix master (pid %d) left running on %s", pid, self.directory)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while self._alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._wait_children_gone(timeout_s)

    def _pidfile_pid(self) -> int | None:
        try:
            pid = int((self.queue_directory / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if self._alive(pid) and self._is_master(pid) else None

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # A zombie child of ours counts as gone.
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state != "Z"

    def _is_master(self, pid: int) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return bool(cmdline) and cmdline[0].endswith(b"master")

    def _wait_children_gone(self, timeout_s: float) -> None:
        """Wait until no Postfix daemon of this instance holds its queue (after master exits)."""
        deadline = time.monotonic() + min(timeout_s, 10.0)
        while self._daemon_pids() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _daemon_pids(self) -> list[int]:
        """Postfix processes whose command line names this instance's config directory."""
        needle = str(self.config_directory).encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if needle in cmdline and self._alive(int(entry.name)):
                pids.append(int(entry.name))
        return pids

    def _diagnostics(self) -> str:
        parts = []
        for path in (self.log_directory / "master.stderr", self.log_path):
            with contextlib.suppress(OSError):
                tail = path.read_text(errors="replace")[-1500:].strip()
                if tail:
                    parts.append(f"{path.name}: {tail}")
        return " | ".join(parts) or "no diagnostics"

    # -- queue -----------------------------------------------------------------------------

    def queue_json(self) -> list[dict[str, Any]]:
        """Every message in the queue, as ``postqueue -j`` describes it (works when stopped too).

        Raises:
            PostfixError: postqueue failed.
        """
        output = _run([str(SBIN / "postqueue"), "-c", str(self.config_directory), "-j"], what="postqueue -j")
        messages = []
        for line in output.splitlines():
            line = line.strip()
            if line.startswith("{"):
                messages.append(json.loads(line))
        return messages

    def message(self, queue_id: str) -> bytes:
        """Header and body of a queued message (``postcat -bh``), LF line ends.

        Raises:
            PostfixError: postcat failed (e.g. the message is gone).
        """
        args = [str(SBIN / "postcat"), "-c", str(self.config_directory), "-bh", "-q", queue_id]
        try:
            proc = subprocess.run(args, capture_output=True, timeout=60, check=False, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PostfixError(f"postcat {queue_id}: {exc}") from exc
        if proc.returncode != 0:
            raise PostfixError(f"postcat {queue_id} failed: {proc.stderr.decode(errors='replace').strip()}")
        return proc.stdout

    def delete(self, queue_ids: list[str], queue: str | None = None) -> None:
        """Remove messages from the queue (``postsuper -d``; only from ``queue`` when given).

        Raises:
            PostfixError: postsuper failed.
        """
        self._postsuper("-d", queue_ids, queue)

    def hold(self, queue_ids: list[str], queue: str = "deferred") -> None:
        """Put messages of ``queue`` on hold (``postsuper -h``): Postfix stops trying them.

        Raises:
            PostfixError: postsuper failed.
        """
        self._postsuper("-h", queue_ids, queue)

    def _postsuper(self, operation: str, queue_ids: list[str], queue: str | None) -> None:
        if not queue_ids:
            return
        self._own_log_file()
        proc_input = "".join(f"{qid}\n" for qid in queue_ids).encode()
        args = [str(SBIN / "postsuper"), "-c", str(self.config_directory), operation, "-", *([queue] if queue else [])]
        try:
            proc = subprocess.run(args, input=proc_input, capture_output=True, timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PostfixError(f"postsuper {operation}: {exc}") from exc
        if proc.returncode != 0:
            raise PostfixError(f"postsuper {operation} failed: {proc.stderr.decode(errors='replace').strip()}")

    def queue_counts(self) -> dict[str, int]:
        """Number of queue files per queue (the original's ``postfix_*_queue_messages``)."""
        counts = {}
        for name in QUEUES:
            total = 0
            for _root, _dirs, files in os.walk(self.queue_directory / name):
                total += len(files)
            counts[name] = total
        return counts

    def retire_log(self) -> None:
        """Move a completely read log aside (``postfix.log.drained``, ``postfix.log.1.drained``).

        Called with Postfix stopped, after the log follower read everything and the queue went
        back to Redis: the next start begins a new log and has nothing to resume.
        """
        for path in (self.log_path.with_name(self.log_path.name + ".1"), self.log_path):
            if path.exists():
                path.replace(path.with_name(path.name + ".drained"))

    def rotate_log(self) -> Path:
        """Rename the maillog file to ``postfix.log.1`` and make postlogd reopen it.

        Returns:
            The rotated file (the log follower finishes it through its open descriptor).
        """
        rotated = self.log_path.with_name(self.log_path.name + ".1")
        self.log_path.replace(rotated)
        if self.running and self.proc is not None:
            self.proc.send_signal(signal.SIGHUP)
        return rotated
