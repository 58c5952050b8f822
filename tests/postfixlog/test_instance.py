"""The private Postfix instance: loopback only, sandbox routing, clean start and stop."""

from __future__ import annotations

import os
import smtplib
from pathlib import Path

import pytest

from common.config.postfixlog import Shaping
from devtools.servers import free_port, wait_until
from devtools.sink import Sink
from postfixlog.instance import PostfixError, PostfixInstance
from postfixlog.rules import load_rules

pytestmark = [pytest.mark.postfix]


def _address(addr_hex: str) -> str:
    """Dotted IPv4 of a /proc/net/tcp address (IPv6 stays hex)."""
    if len(addr_hex) != 8:
        return addr_hex
    return ".".join(str(int(addr_hex[i : i + 2], 16)) for i in (6, 4, 2, 0))


def _listening_sockets() -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket, from /proc/net/tcp and tcp6."""
    found = set()
    for name, width in (("tcp", 8), ("tcp6", 32)):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state = fields[1], fields[3]
            if state != "0A":  # LISTEN
                continue
            addr_hex, port_hex = local.split(":")
            assert len(addr_hex) == width
            addr = _address(addr_hex)
            found.add((addr, int(port_hex, 16)))
    return found


def _inodes_of(pids: list[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            for fd in fd_dir.iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    return inodes


def _postfix_listeners(instance: PostfixInstance) -> set[tuple[str, int]]:
    """Listening TCP sockets held by the instance's processes."""
    inodes = _inodes_of(instance._daemon_pids())
    found = set()
    for name in ("tcp", "tcp6"):
        for line in (Path("/proc/net") / name).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                addr_hex, port_hex = fields[1].split(":")
                found.add((_address(addr_hex), int(port_hex, 16)))
    return found


def test_postfix_listens_on_loopback_only(make_postfix, sink: Sink) -> None:
    # Postfix relays for anyone who reaches it: its only listener must be 127.0.0.1:<port>.
    instance = make_postfix(f"[127.0.0.1]:{sink.port}")
    listeners = _postfix_listeners(instance)
    assert listeners == {("127.0.0.1", instance.smtpd_port)}
    assert ("127.0.0.1", instance.smtpd_port) in _listening_sockets()


def test_sandbox_routes_everything_to_the_sink(make_postfix, sink: Sink) -> None:
    # In sandbox mode even a French ISP (slow transport) and any other domain go to the sink.
    instance = make_postfix(f"[127.0.0.1]:{sink.port}", {"transport_maps": "hash:/nonexistent"})
    main_cf = (instance.config_directory / "main.cf").read_text()
    assert f"relayhost = [127.0.0.1]:{sink.port}" in main_cf
    assert "smtp_dns_support_level = disabled" in main_cf
    assert "hash:/nonexistent" not in main_cf
    with smtplib.SMTP("127.0.0.1", instance.smtpd_port, local_hostname="client.test") as smtp:
        for rcpt in ("someone@orange.fr", "other@example.com"):
            smtp.sendmail("sender@example.test", [rcpt], b"Subject: t\r\n\r\nbody\r\n")
    wait_until(lambda: len(sink.messages) == 2, 15, what="both messages at the sink")
    assert {m.rcpt for m in sink.messages} == {"someone@orange.fr", "other@example.com"}


def test_overrides_are_rendered_and_managed_parameters_refused(postfix_dir: Path) -> None:
    instance = PostfixInstance(
        postfix_dir / "pf",
        smtpd_port=10025,
        main_cf={
            "myhostname": "mta.customer.test",
            "mailname": "customer.test",
            "maximal_queue_lifetime": "1d",
            "smtputf8_enable": False,
        },
    )
    text = instance.main_cf_text()
    assert "myhostname = mta.customer.test" in text
    assert "myorigin = customer.test" in text
    assert "maximal_queue_lifetime = 1d" in text
    assert text.count("\nmaximal_queue_lifetime =") == 1
    assert "smtputf8_enable = no" in text
    assert "inet_interfaces = 127.0.0.1" in text
    instance.render()
    assert "127.0.0.1:10025 inet" in instance.master_cf_text()
    with pytest.raises(ValueError, match="'inet_interfaces' is managed by PostfixLog"):
        PostfixInstance(postfix_dir / "x", smtpd_port=1, main_cf={"inet_interfaces": "all"})
    with pytest.raises(ValueError, match="single line"):
        PostfixInstance(postfix_dir / "x", smtpd_port=1, main_cf={"smtpd_banner": "a\nrelayhost = evil"})


def test_shaping_rules_become_provider_transports(postfix_dir: Path) -> None:
    # The French ISPs of the former "slow" transport keep its limits, now as their own
    # transports; the routing header selects them; Postfix accepts what is rendered.
    rules = load_rules(Shaping(), Path("customer.yaml"))
    instance = PostfixInstance(postfix_dir / "pf", smtpd_port=free_port(), rules=rules)
    main_cf, master_cf = instance.main_cf_text(), instance.master_cf_text()
    for provider in ("orange", "free", "laposte"):
        assert f"ib_{provider} unix - - n - 3 smtp" in master_cf
        assert f"ib_{provider}_destination_concurrency_limit = 3" in main_cf
        assert f"ib_{provider}_destination_rate_delay = 5s" in main_cf
        assert f"ib_{provider}_destination_recipient_limit = 20" in main_cf
        assert f"ib_{provider}_destination_concurrency_failed_cohort_limit = 10" in main_cf
    assert "ib_google unix - - n - 10 smtp" in master_cf
    assert "-o smtp_connection_reuse_count_limit=50" in master_cf
    assert "ib_google_u8 unix" in master_cf and "ib_default unix - - n - 20 smtp" in master_cf
    instance.render()
    checks = (instance.config_directory / "header_checks").read_text().splitlines()
    assert "/^X-IB-Route: gmx-webde$/ FILTER ib_gmx_webde:" in checks
    assert "/^X-IB-Route: google utf8$/ FILTER ib_google_u8:" in checks
    assert checks[-1] == "/[^[:space:] -~]/ FILTER smtputf8:"
    nested = (instance.config_directory / "body_header_checks").read_text()
    assert "X-IB-Route" not in nested  # an attached message cannot choose a transport
    assert "smtp_header_checks = regexp:{ {/^X-IB-Route:/ IGNORE} }" in main_cf
    instance.check()  # postfix check: no complaint about what was rendered


def test_relayhost_applies_to_routed_mail(postfix_dir: Path) -> None:
    # Routed mail is a FILTER: without default_filter_nexthop it would bypass the relay host.
    rules = load_rules(Shaping(), Path("customer.yaml"))
    instance = PostfixInstance(
        postfix_dir / "pf", smtpd_port=free_port(), rules=rules, main_cf={"relayhost": "[smarthost.test]:587"}
    )
    assert "default_filter_nexthop = [smarthost.test]:587" in instance.main_cf_text()


def test_bad_configuration_is_reported_with_postfix_complaint(postfix_dir: Path) -> None:
    # Postfix is silent without a TTY; start() must still say what is wrong.
    instance = PostfixInstance(postfix_dir / "pf", smtpd_port=free_port(), main_cf={"default_process_limit": "many"})
    with pytest.raises(Exception, match="default_process_limit"):
        instance.start(timeout_s=10)
    instance.stop()


def test_stale_master_is_stopped_before_start(postfix_dir: Path, sink: Sink) -> None:
    # A master left behind by a killed PostfixLog must not block the next start.
    first = PostfixInstance(postfix_dir / "pf", smtpd_port=free_port(), nexthop=f"[127.0.0.1]:{sink.port}")
    first.start()
    stale_pid = first.pid
    assert stale_pid is not None
    second = PostfixInstance(postfix_dir / "pf", smtpd_port=first.smtpd_port, nexthop=f"[127.0.0.1]:{sink.port}")
    try:
        second.start()
        assert second.pid != stale_pid
        assert first.proc is not None
        assert first.proc.wait(10) is not None
        assert second.answers()
    finally:
        second.stop()
        first.stop()


def test_stop_leaves_no_postfix_process(make_postfix, sink: Sink) -> None:
    instance = make_postfix(f"[127.0.0.1]:{sink.port}")
    assert instance._daemon_pids()
    instance.stop()
    assert not instance._daemon_pids()
    assert not instance.answers()
    assert instance.proc is not None and instance.proc.returncode is not None


def test_private_directory_is_refused_with_a_clear_reason(tmp_path: Path) -> None:
    # pytest's tmp_path is mode 0700: the postfix user could not reach its queue.
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    instance = PostfixInstance(private / "pf", smtpd_port=free_port())
    with pytest.raises(PostfixError, match="user postfix cannot enter"):
        instance.render()
