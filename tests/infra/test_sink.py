"""The devtools SMTP sink: its second, 7-bit port plays an old receiver (no 8BITMIME, no SMTPUTF8)."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator

import pytest

from devtools.servers import free_port
from devtools.sink import Sink


@pytest.fixture
def sink() -> Iterator[Sink]:
    with Sink(seven_bit_port=free_port()) as running:
        yield running


def _client(port: int) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10)
    client.ehlo()
    return client


def test_main_port_offers_8bitmime_and_smtputf8(sink: Sink) -> None:
    with _client(sink.port) as client:
        assert client.has_extn("8bitmime") and client.has_extn("smtputf8")
        client.sendmail("a@b.test", ["c@d.test"], "Subject: é\r\n\r\nGrüße\r\n".encode(), ["BODY=8BITMIME", "SMTPUTF8"])
    [message] = sink.messages
    assert not message.seven_bit and "SMTPUTF8" in message.mail_options


def test_seven_bit_port_refuses_what_it_does_not_offer(sink: Sink) -> None:
    assert sink.seven_bit_port is not None
    with _client(sink.seven_bit_port) as client:
        assert not client.has_extn("8bitmime") and not client.has_extn("smtputf8")
        code, text = client.docmd("MAIL FROM:<a@b.test> BODY=8BITMIME")
        assert code == 555 and text.startswith(b"5.5.4"), text
        code, text = client.docmd("MAIL FROM:<a@b.test> SMTPUTF8")
        assert code == 555, text
        client.mail("a@b.test")
        client.rcpt("c@d.test")
        code, text = client.data("Subject: x\r\n\r\nGrüße\r\n".encode())
        assert code == 554 and text.startswith(b"5.6.1"), text
        client.sendmail("a@b.test", ["c@d.test"], b"Subject: x\r\n\r\n7-bit\r\n")
    [message] = sink.messages
    assert message.seven_bit and message.data.endswith(b"7-bit\r\n")


def test_throttle_answers_421_beyond_the_count_per_window() -> None:
    # A provider rate-limiting the sender: 3 recipients per window, then the throttle reply.
    codes = []
    with Sink(throttle=(3, 60.0, "421 4.7.0 <{addr}>: too many messages, slow down")) as sink, _client(sink.port) as c:
        for i in range(5):
            c.rset()
            c.docmd("MAIL FROM:<a@b.test>")
            codes.append(c.docmd(f"RCPT TO:<r{i}@d.test>")[0])
    assert codes == [250, 250, 250, 421, 421]
    assert sink.handler.throttled == 2


def test_latency_delays_the_answer_to_data() -> None:
    # Like a receiver across the internet: DATA is answered only after the configured delay.
    with Sink(latency=(0.3, 0.3)) as sink, _client(sink.port) as client:
        started = time.monotonic()
        client.sendmail("a@b.test", ["c@d.test"], b"Subject: x\r\n\r\nbody\r\n")
        assert time.monotonic() - started >= 0.3
    assert len(sink.messages) == 1


def test_free_ports_asked_in_a_row_are_all_different() -> None:
    # Released at once, a port may be offered again before its taker binds it; a stack's port
    # map must still name every port once (its MX once answered another service's health check).
    ports = [free_port() for _ in range(1000)]
    assert len(set(ports)) == len(ports)
