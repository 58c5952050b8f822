"""Receiver on Redis with Sentinel: 250 once a replica has the message; 451 while none confirms or no primary."""

from __future__ import annotations

import contextlib
import os
import signal
import smtplib
from pathlib import Path
from typing import Any

import pytest

from common.payloads import SubmittedMail
from devtools import testing
from devtools.redisha import LocalRedisHA
from devtools.servers import wait_until
from tests.receiver.conftest import P1, message, start_receiver

# Real processes: a Receiver, a primary, a replica and three sentinels.
pytestmark = [pytest.mark.redis, pytest.mark.slow]

SENDER = f"app@{testing.SENDER_DOMAIN}"


def _send(client: smtplib.SMTP, raw: bytes) -> tuple[int, bytes]:
    client.mail(SENDER)
    client.rcpt("someone@dest.test")
    return client.data(raw)


def _first_refusal(client: smtplib.SMTP, raw: bytes) -> int:
    """The first reply of a transaction that is not a success (or DATA's final 250)."""
    for code, _ in (client.mail(SENDER), client.rcpt("someone@dest.test")):
        if code >= 400:
            return code
    return client.data(raw)[0]


def _queued(cluster: LocalRedisHA, port: int) -> list[str]:
    with contextlib.closing(cluster.admin(port)) as admin:
        rows: Any = admin.xrange(P1)
    return [SubmittedMail.from_fields(fields).uuid for _, fields in rows]


def test_receiver_acknowledges_after_a_replica_and_follows_a_failover(tmp_path: Path) -> None:
    with LocalRedisHA(tmp_path / "ha", replicas=1) as cluster:
        override = {
            "common-config": {"redis": {**cluster.redis_block(), "wait-timeout-seconds": 0.5}},
            "receiver": {"reliable-queue": None},
        }
        receiver = start_receiver(tmp_path / "receiver", cluster.node_ports[0], override)
        try:
            primary = cluster.primary_port()
            assert primary is not None
            replica = cluster.node(next(p for p in cluster.node_ports if p != primary))
            with receiver.authenticated() as client:
                # 250 means the replica has it: no polling.
                assert _send(client, message(uuid="first"))[0] == 250
                assert _queued(cluster, replica.port) == ["first"]
                # A replica that does not confirm in time: 451, the client keeps the message.
                assert replica.proc is not None
                os.kill(replica.proc.pid, signal.SIGSTOP)
                try:
                    code, text = _send(client, message(uuid="unconfirmed"))
                finally:
                    os.kill(replica.proc.pid, signal.SIGCONT)
                assert (code, text) == (451, b"4.3.0 Mail queue temporarily unavailable, try again later")
            assert receiver.metric('mailer_receiver_temporary_failures_total{reason="replica-unconfirmed"}') == 1
            # The primary's machine is lost: temporary failures until the sentinels name a new
            # primary and it has a replica again (the old node comes back as one), then 250.
            # Which command fails first depends on timing: AUTH (454, the login guard cannot reach
            # Redis) or DATA (451).
            cluster.kill(primary)
            answers: list[int] = []

            def accepted() -> bool:
                try:
                    with receiver.authenticated() as client:
                        answers.append(_first_refusal(client, message(uuid="after")))
                except smtplib.SMTPResponseException as exc:
                    answers.append(exc.smtp_code)
                except (smtplib.SMTPException, OSError):
                    answers.append(0)
                proc = cluster.node(primary).proc
                dead = proc is not None and proc.poll() is not None
                if answers[-1] != 250 and dead and cluster.primary_port() not in (None, primary):
                    cluster.restart(primary)  # the pod comes back, as a replica
                return answers[-1] == 250

            wait_until(accepted, timeout_s=60, interval_s=0.2, what="a 250 after the failover")
            assert answers[:-1] and set(answers[:-1]) <= {421, 451, 454}, answers  # temporary, never 5xx
            new = cluster.primary_port()
            assert new not in (None, primary)
            assert new is not None
            assert {"first", "after"} <= set(_queued(cluster, new))
            assert receiver.stop() == 0
        finally:
            receiver.stop()
