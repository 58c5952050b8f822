"""The log follower against real Redis: restart, rotation, truncation, exactly-once commits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis

from common.errors import TemporaryError
from postfixlog import records
from postfixlog.follower import LogFollower, LogReader
from postfixlog.follower import fingerprint as follower_fingerprint
from postfixlog.records import Delivery

from .conftest import events_of

pytestmark = [pytest.mark.redis]


def _message_lines(n: int, rcpt: str = "ok@dest.test") -> list[str]:
    """Log lines of one injected message (token tok<n>) delivered by Postfix."""
    qid = f"4jZLBz5lN{n % 10}zJF{'BCDFGHJKLM'[n % 10]}{'BCDFGHJKLM'[(n // 10) % 10]}"
    return [
        f"Nov 25 13:30:03 mta postfix/smtpd[10]: {qid}: client=unknown[127.0.0.1], orig_queue_id=tok{n}",
        f"Nov 25 13:30:03 mta postfix/qmgr[11]: {qid}: from=<bounce-u{n}-t@b.example.test>, "
        "size=1, nrcpt=1 (queue active)",
        f"Nov 25 13:30:03 mta postfix/smtp[12]: {qid}: to=<{rcpt}>, relay=127.0.0.1[127.0.0.1]:25, delay=0.1, "
        f"delays=0/0/0/0.1, dsn=2.0.0, status=sent (250 ok {n})",
        f"Nov 25 13:30:03 mta postfix/qmgr[11]: {qid}: removed",
    ]


def _record(client: Any, n: int) -> None:
    delivery = Delivery(
        uuid=f"u{n}", recipient="ok@dest.test", mail_from=f"bounce-u{n}-t@b.example.test", from_domain="x.test"
    )
    client.hset(records.tx_key(f"tok{n}"), mapping=delivery.to_hash())


def _append(path: Path, lines: list[str]) -> None:
    with path.open("a") as f:
        f.write("".join(line + "\n" for line in lines))


def _follower(client: Any, path: Path, **kwargs: Any) -> LogFollower:
    return LogFollower(
        LogReader(path), client, event_queue="EVENT_QUEUE", instance_name="pf-1", qid_ttl_s=600, **kwargs
    )


def _drain(follower: LogFollower) -> None:
    """Run steps until nothing is left (the thread's loop, synchronously)."""
    if not follower._restored:
        follower._restore()
    for _ in range(1000):
        if not follower.step():
            return
    raise AssertionError("follower did not settle")


def _uuids(client: Any) -> list[str]:
    return [e["uuid"] for e in events_of(client)]


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    path = tmp_path / "postfix.log"
    path.write_text("Nov 25 13:30:00 mta postfix/master[1]: daemon started -- version 3.7.11\n")
    return path


def test_restart_resumes_where_it_stopped(redis_client: Any, log_path: Path) -> None:
    # Nothing read twice, nothing skipped, across a restart of the follower.
    for n in (1, 2, 3):
        _record(redis_client, n)
    _append(log_path, _message_lines(1) + _message_lines(2))
    _drain(_follower(redis_client, log_path))
    assert _uuids(redis_client) == ["u1", "u2"]
    _append(log_path, _message_lines(3))
    _drain(_follower(redis_client, log_path))
    assert _uuids(redis_client) == ["u1", "u2", "u3"]
    position = records.Position.decode(redis_client.get(records.position_key("pf-1")))
    assert position is not None
    assert position.offset == log_path.stat().st_size
    assert 0 < redis_client.ttl(records.position_key("pf-1")) <= records.POSITION_TTL_S
    assert not redis_client.keys("IB:postfixlog:qid:*")  # removed -> record deleted


def test_a_second_outcome_for_a_finished_recipient_is_not_reported_again(redis_client: Any, log_path: Path) -> None:
    # Postfix logs "status=sent", then marks the recipient done in its queue file; stopped in
    # between, it delivers the same copy again after the restart and logs a second outcome (here
    # across a follower restart too): the customer gets one terminal event per recipient.
    _record(redis_client, 1)
    lines = _message_lines(1)
    _append(log_path, lines[:3])
    _drain(_follower(redis_client, log_path))
    second = lines[2].replace("status=sent (250 ok 1)", "status=sent (250 ok again)").replace("[12]", "[13]")
    bounced = lines[2].replace("dsn=2.0.0, status=sent (250 ok 1)", "dsn=5.1.1, status=bounced (550 5.1.1 gone)")
    _append(log_path, [second, bounced, lines[3]])
    _drain(_follower(redis_client, log_path))
    assert [(e["uuid"], e["event"]) for e in events_of(redis_client)] == [("u1", "delivered")]
    assert not redis_client.keys("IB:postfixlog:qid:*")


def test_instances_never_read_each_others_records(redis_client: Any, tmp_path: Path) -> None:
    # Two delivery instances whose Postfix gave two different messages the same queue id (they
    # run on different volumes): each instance's lines are interpreted with its own record only.
    qid = "4jZLBz5lN1zJFBB"
    for name, n in (("pf-a", 1), ("pf-b", 2)):
        delivery = Delivery(
            uuid=f"u{n}", recipient=f"r{n}@dest.test", mail_from=f"bounce-u{n}-t@b.example.test", from_domain="x"
        )
        redis_client.hset(records.qid_key(name, qid), mapping=delivery.with_queue_id(qid, accepted=True).to_hash())
    lines = {
        "pf-a": f"Nov 25 13:30:03 mta-a postfix/smtp[12]: {qid}: to=<r1@dest.test>, relay=127.0.0.1[127.0.0.1]:25, "
        "delay=0.1, delays=0/0/0/0.1, dsn=2.0.0, status=sent (250 ok)",
        "pf-b": f"Nov 25 13:30:04 mta-b postfix/smtp[13]: {qid}: to=<r2@dest.test>, relay=127.0.0.1[127.0.0.1]:25, "
        "delay=0.1, delays=0/0/0/0.1, dsn=5.1.1, status=bounced (550 5.1.1 user unknown)",
    }
    for name in ("pf-b", "pf-a"):
        path = tmp_path / name / "postfix.log"
        path.parent.mkdir()
        _append(path, [lines[name]])
        _drain(LogFollower(LogReader(path), redis_client, event_queue="EVENT_QUEUE", instance_name=name, qid_ttl_s=60))
    assert [(e["event"], e["uuid"], e["recipient"]) for e in events_of(redis_client)] == [
        ("bounce", "u2", "r2@dest.test"),
        ("delivered", "u1", "r1@dest.test"),
    ]


def test_state_written_before_per_instance_keys_is_used_once(redis_client: Any, log_path: Path) -> None:
    # An upgrade from one instance: the shared position hash and un-namespaced queue-id records
    # are picked up, so the first start neither repeats the log nor loses its last events.
    lines = _message_lines(1)
    _append(log_path, lines[:2])
    legacy_offset = log_path.stat().st_size
    qid = lines[0].split()[5].rstrip(":")
    delivery = Delivery(uuid="u1", recipient="ok@dest.test", mail_from="bounce-u1-t@b.example.test", from_domain="x")
    redis_client.hset(records.legacy_qid_key(qid), mapping=delivery.with_queue_id(qid, accepted=True).to_hash())
    inode = log_path.stat().st_ino
    first = log_path.read_bytes().split(b"\n")[0] + b"\n"
    redis_client.hset(records.LEGACY_POSITION_KEY, "pf-1", f"{inode}:{legacy_offset}:{follower_fingerprint(first)}")
    _append(log_path, lines[2:])
    _drain(_follower(redis_client, log_path))
    assert [(e["event"], e["uuid"]) for e in events_of(redis_client)] == [("delivered", "u1")]
    assert not redis_client.hexists(records.LEGACY_POSITION_KEY, "pf-1")
    saved = records.Position.decode(redis_client.get(records.position_key("pf-1")))
    assert saved is not None and saved.offset == log_path.stat().st_size


def test_rotation_while_running_finishes_the_old_file(redis_client: Any, log_path: Path) -> None:
    for n in (1, 2, 3):
        _record(redis_client, n)
    _append(log_path, _message_lines(1))
    follower = _follower(redis_client, log_path)
    _drain(follower)
    # postlogd still writes to the renamed file until it reopens, then to a new one.
    rotated = log_path.with_name("postfix.log.1")
    log_path.rename(rotated)
    _append(rotated, _message_lines(2))
    _drain(follower)
    _append(log_path, _message_lines(3))
    _drain(follower)
    assert _uuids(redis_client) == ["u1", "u2", "u3"]


def test_rotation_while_stopped_is_finished_after_restart(redis_client: Any, log_path: Path) -> None:
    for n in (1, 2, 3):
        _record(redis_client, n)
    _append(log_path, _message_lines(1))
    _drain(_follower(redis_client, log_path))
    rotated = log_path.with_name("postfix.log.1")
    log_path.rename(rotated)
    _append(rotated, _message_lines(2))
    log_path.write_text("Nov 25 13:31:00 mta postfix/master[2]: daemon started -- version 3.7.11\n")
    _append(log_path, _message_lines(3))
    _drain(_follower(redis_client, log_path))
    assert _uuids(redis_client) == ["u1", "u2", "u3"]


def test_truncated_log_is_read_from_the_start(redis_client: Any, log_path: Path) -> None:
    for n in (1, 2):
        _record(redis_client, n)
    _append(log_path, _message_lines(1))
    follower = _follower(redis_client, log_path)
    _drain(follower)
    log_path.write_text("")  # copytruncate-style rotation
    _drain(follower)
    _append(log_path, _message_lines(2)[:1])
    _drain(follower)
    _append(log_path, _message_lines(2)[1:])
    _drain(follower)
    assert _uuids(redis_client) == ["u1", "u2"]


def test_new_log_file_after_restart_is_read_from_its_start(redis_client: Any, log_path: Path) -> None:
    # A new instance directory (new file, other inode and first line): start at offset 0.
    for n in (1, 2):
        _record(redis_client, n)
    _append(log_path, _message_lines(1))
    _drain(_follower(redis_client, log_path))
    log_path.unlink()
    log_path.write_text("Nov 26 08:00:00 mta postfix/master[9]: daemon started -- version 3.7.11\n")
    _append(log_path, _message_lines(2))
    _drain(_follower(redis_client, log_path))
    assert _uuids(redis_client) == ["u1", "u2"]


def test_size_rotation_when_fully_read(redis_client: Any, log_path: Path) -> None:
    rotations: list[Path] = []

    def rotate() -> None:
        rotated = log_path.with_name("postfix.log.1")
        log_path.replace(rotated)
        log_path.write_text("")
        rotations.append(rotated)

    for n in (1, 2):
        _record(redis_client, n)
    _append(log_path, _message_lines(1))
    follower = _follower(redis_client, log_path, rotate=rotate, rotate_bytes=100)
    _drain(follower)
    assert len(rotations) == 1
    _append(log_path, _message_lines(2))
    _drain(follower)
    assert _uuids(redis_client) == ["u1", "u2"]


@pytest.mark.slow
def test_commit_failure_leaves_position_and_events_unchanged(
    redis_client: Any, redis_server: Any, log_path: Path
) -> None:
    # Redis refuses the MULTI: no event, no position; the same lines are committed once later.
    _record(redis_client, 1)
    _append(log_path, _message_lines(1))
    follower = _follower(redis_client, log_path)
    follower._restore()
    follower.redis = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    with pytest.raises(TemporaryError):
        follower.step()
    assert _uuids(redis_client) == []
    assert follower.reader.offset == 0
    follower.redis = redis_client
    _drain(follower)
    assert _uuids(redis_client) == ["u1"]


def test_unknown_and_garbage_lines_are_counted_not_fatal(redis_client: Any, log_path: Path) -> None:
    counted: list[Any] = []

    class Metrics:
        def count(self, effects: Any) -> None:
            counted.append(effects.counts)

        def lag(self, unread_bytes: int) -> None:
            pass

    _append(log_path, ["\x00\x00garbage", "Nov 25 13:30:03 mta postfix/smtp[1]: 4jZLBz5lN8zJFtX: to=<a@b>, weird"])
    _log = log_path.open("ab")
    _log.write(b"\xff\xfe not utf-8\n")
    _log.close()
    _drain(_follower(redis_client, log_path, metrics=Metrics()))
    assert sum(c["line:unparsed"] for c in counted) == 3
