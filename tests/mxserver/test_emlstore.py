"""The eml directory stays within its bounds, never overwrites, survives restarts."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from common.config import Config
from mxserver.emlstore import EmlStore
from tests.mxserver.conftest import RunningMx


def test_count_bound_removes_oldest(tmp_path: Path) -> None:
    store = EmlStore(tmp_path, max_files=3, max_bytes=10_000).open()
    paths = [store.save(f"mail {i}\n".encode()) for i in range(5)]
    remaining = sorted(tmp_path.glob("*.eml"))
    assert remaining == sorted(paths[2:])
    assert store.count == 3
    assert store.total_bytes == sum(p.stat().st_size for p in remaining)


def test_size_bound_removes_oldest_but_keeps_the_newest(tmp_path: Path) -> None:
    store = EmlStore(tmp_path, max_files=100, max_bytes=2500).open()
    first = store.save(b"a" * 1000)
    second = store.save(b"b" * 1000)
    third = store.save(b"c" * 1000)  # 3000 > 2500: the oldest goes
    assert not first.exists() and second.exists() and third.exists()
    huge = store.save(b"d" * 5000)  # alone over the bound: kept, everything older goes
    assert [p.name for p in tmp_path.glob("*.eml")] == [huge.name]
    assert store.total_bytes == 5000


def test_names_are_unique_and_ordered(tmp_path: Path) -> None:
    # The original used a counter restarting at 1 (overwrites after a restart); ours never collide.
    names = []
    for _ in range(3):
        store = EmlStore(tmp_path, max_files=10_000, max_bytes=10**9).open()  # a "restart" each round
        names += [store.save(b"x").name for _ in range(50)]
    assert len(set(names)) == 150
    assert names == sorted(names)
    assert len(list(tmp_path.glob("*.eml"))) == 150


def test_restart_indexes_existing_files_and_applies_bounds(tmp_path: Path) -> None:
    store = EmlStore(tmp_path, max_files=100, max_bytes=10**6).open()
    for i in range(10):
        path = store.save(b"y" * 100)
        os.utime(path, ns=(i * 10**9, i * 10**9))  # distinct mtimes, oldest first
    (tmp_path / "1.eml").write_bytes(b"from the original service")  # a legacy name
    os.utime(tmp_path / "1.eml", ns=(0, 0))
    (tmp_path / ".tmp-crashed.eml").write_bytes(b"partial")
    reopened = EmlStore(tmp_path, max_files=4, max_bytes=10**6).open()
    assert reopened.count == 4
    assert not (tmp_path / ".tmp-crashed.eml").exists()
    assert not (tmp_path / "1.eml").exists()  # the oldest by mtime went first


def test_write_failure_raises_and_leaves_no_partial_file(tmp_path: Path) -> None:
    store = EmlStore(tmp_path / "gone", max_files=10, max_bytes=10**6).open()
    (tmp_path / "gone").rmdir()
    with pytest.raises(OSError):
        store.save(b"data")
    assert store.count == 0


@pytest.mark.redis
def test_disk_failure_answers_451(
    redis_client: object, mx_config: Callable[..., Config], start_mx: Callable[[Config], RunningMx], tmp_path: Path
) -> None:
    # An unclassified mail that cannot be written is not accepted: 451 4.3.0, the sender retries.
    mx = start_mx(mx_config())
    mx.eml_dir.rmdir()
    code, text = mx.send(["postmaster@bounces.example.test"], b"Subject: hi\r\n\r\nhello\r\n", "a@b.example")
    assert (code, text[:5]) == (451, b"4.3.0")
    assert mx.metric("mailer_mxserver_temporary_failures_total", cause="disk") == 1


@pytest.mark.redis
def test_server_keeps_directory_bounded(
    redis_client: object, mx_config: Callable[..., Config], start_mx: Callable[[Config], RunningMx]
) -> None:
    mx = start_mx(mx_config({"eml-directory-max-files": 3}))
    for i in range(6):
        assert mx.send(["postmaster"], f"Subject: {i}\r\n\r\nhello {i}\r\n".encode(), "a@b.example")[0] == 250
    kept = sorted(mx.eml_dir.glob("*.eml"))
    assert len(kept) == 3
    assert b"hello 5" in kept[-1].read_bytes() and b"hello 3" in kept[0].read_bytes()
    assert mx.metric("mxserver_received_unclassified_total") == 6
    assert mx.metric("mailer_mxserver_eml_directory_files") == 3
