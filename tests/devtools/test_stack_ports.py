"""The local stack on other ports: ``MAILER_PORT_OFFSET`` shifts every port of ``./mailer up``."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

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
