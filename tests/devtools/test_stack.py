"""The local stack: ``MAILER_PORT_OFFSET`` shifts every port of ``./mailer up``; Ctrl-C stops it in order."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from common.config import load_config
from devtools.servers import RedisProcess
from devtools.stack import DEFAULT_PORTS, Stack, default_ports


def test_no_offset_means_the_documented_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAILER_PORT_OFFSET", raising=False)
    assert default_ports() == DEFAULT_PORTS
    assert DEFAULT_PORTS["receiver"] == 2587 and DEFAULT_PORTS["httpreceiver"] == 8080


def test_the_offset_shifts_every_port_and_the_configuration(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MAILER_PORT_OFFSET", "1000")
    stack = Stack(tmp_path / "run")
    stack.prepare()
    assert stack.ports == {name: port + 1000 for name, port in DEFAULT_PORTS.items()}
    customer = yaml.safe_load(stack.customer_file.read_text())
    assert customer["receiver"]["bind"]["inet-port"] == 3587
    assert customer["httpreceiver"]["bind"]["inet-port"] == 9080
    assert customer["transformer"]["unsubscribe-url"].startswith("http://127.0.0.1:9080/")
    # A run directory remembers its ports; the same offset again is fine, another one is refused.
    Stack(tmp_path / "run").prepare()
    monkeypatch.setenv("MAILER_PORT_OFFSET", "2000")
    with pytest.raises(RuntimeError, match="set up with other ports"):
        Stack(tmp_path / "run").prepare()


@pytest.mark.parametrize("value", ["ten", "70000", "-2000"])
def test_a_bad_offset_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("MAILER_PORT_OFFSET", value)
    with pytest.raises(RuntimeError, match="MAILER_PORT_OFFSET"):
        default_ports()


@pytest.mark.redis
def test_ctrl_c_does_not_reach_redis_first(tmp_path: Path) -> None:
    # Ctrl-C signals the terminal's whole process group; Redis must not be in it, or it dies
    # before PostfixLog can hand Postfix' queue back to it (the stack stops Redis last itself).
    redis = RedisProcess(tmp_path / "redis").start()
    try:
        assert redis.proc is not None
        assert os.getpgid(redis.proc.pid) != os.getpgid(0)
    finally:
        redis.stop()


def test_a_relative_run_directory_gives_a_configuration_that_loads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # `./mailer up --run-dir run-2`: the DKIM key's path in the customer file is read relative to
    # the file's directory, so it must not be written relative to where the command ran.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MAILER_PORT_OFFSET", raising=False)
    stack = Stack(Path("run-2"))
    stack.prepare()
    config = load_config(stack.global_file, stack.customer_file, service="transformer")
    assert config.customer.transformer is not None
    assert stack.run_dir == tmp_path / "run-2"
