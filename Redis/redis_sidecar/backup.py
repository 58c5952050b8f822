"""Back up Redis' data to object storage and restore it into an empty data directory.

A backup is an RDB snapshot (the format the original uploaded as ``dump.rdb``, so its buckets
restore too):

* final backup (on stop): ``CLIENT PAUSE WRITE`` first, so no write is acknowledged after the
  snapshot, then ``SAVE`` and upload.  Writes held by the pause are never answered; Redis stops
  next, so their clients retry elsewhere or later (nothing accepted is lost);
* periodic / manual backup: ``BGSAVE`` (Redis keeps serving) and upload.

Restore runs before redis-server starts and only when the data directory holds no AOF (local
data is always newer than the bucket).  With ``appendonly yes`` Redis ignores a bare
``dump.rdb``, so the snapshot is installed as the *base file* of a Redis 7 multi-part AOF
(``appendonlydir/appendonly.aof.1.base.rdb`` plus a manifest); Redis loads it and appends to it.
The bucket object is never deleted.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import redis

from common import keys, redisreply
from redis_sidecar.storage import ObjectStore, StorageError

log = logging.getLogger(__name__)

APPEND_DIR: Final = "appendonlydir"
APPEND_FILE: Final = "appendonly.aof"
RDB_FILE: Final = "dump.rdb"
#: Redis key holding the time of the last successful periodic or manual backup.
LAST_BACKUP_KEY: Final = keys.service_key("redis", "last-backup")


class BackupError(Exception):
    """A backup or restore step failed; the message says which and why."""


@dataclass(frozen=True)
class DataLayout:
    """File names inside Redis' data directory (also handed to redis-server at start)."""

    directory: Path

    @property
    def aof_dir(self) -> Path:
        """The multi-part AOF directory."""
        return self.directory / APPEND_DIR

    @property
    def manifest(self) -> Path:
        """The AOF manifest; its presence means the directory holds data."""
        return self.aof_dir / f"{APPEND_FILE}.manifest"

    @property
    def rdb(self) -> Path:
        """Where SAVE/BGSAVE write the snapshot."""
        return self.directory / RDB_FILE

    def redis_settings(self) -> dict[str, str]:
        """redis.conf lines that make redis-server use exactly these names."""
        return {
            "dir": str(self.directory),
            "appenddirname": APPEND_DIR,
            "appendfilename": APPEND_FILE,
            "dbfilename": RDB_FILE,
        }


def check_rdb(path: Path) -> None:
    """Refuse anything that is not a valid RDB file.

    Raises:
        BackupError: wrong magic, or ``redis-check-rdb`` (when installed) finds it corrupt.
    """
    with path.open("rb") as f:
        magic = f.read(9)
    if not (magic.startswith(b"REDIS") and magic[5:].isdigit()):
        raise BackupError(f"{path.name} is not an RDB snapshot (starts with {magic[:9]!r})")
    checker = shutil.which("redis-check-rdb")
    if checker is None:
        return
    result = subprocess.run([checker, str(path)], capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr).strip().splitlines()[-3:]
        raise BackupError(f"{path.name} is corrupt: {' / '.join(tail)}")


def install_rdb(rdb: Path, layout: DataLayout) -> None:
    """Make ``rdb`` the base of a fresh multi-part AOF in ``layout`` (consumes ``rdb``).

    Built in a temporary directory and renamed into place, so a crash midway leaves no
    half-restored AOF behind.
    """
    staging = layout.directory / f"{APPEND_DIR}.restoring"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    base = staging / f"{APPEND_FILE}.1.base.rdb"
    os.replace(rdb, base)
    manifest = staging / f"{APPEND_FILE}.manifest"
    manifest.write_text(f"file {base.name} seq 1 type b\n", encoding="ascii")
    for path in (base, manifest):
        _fsync(path)
    _fsync(staging)
    os.replace(staging, layout.aof_dir)
    _fsync(layout.directory)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def restore(store: ObjectStore | None, layout: DataLayout) -> str:
    """Prepare the data directory before redis-server starts; returns what was done.

    Raises:
        BackupError: a backup exists but could not be fetched or is corrupt.  Starting empty
            then would later overwrite the good backup with an empty one, so the caller must
            not start Redis.
    """
    layout.directory.mkdir(parents=True, exist_ok=True)
    if layout.manifest.exists():
        return f"kept the local data in {layout.aof_dir}"
    if layout.rdb.exists():
        # A snapshot without an AOF (e.g. a volume of the original, which ran without AOF).
        check_rdb(layout.rdb)
        install_rdb(layout.rdb, layout)
        return f"loaded the local snapshot {layout.rdb.name} into a new AOF"
    if store is None:
        return "no local data and no object storage configured: starting empty"
    part = layout.directory / "restore.rdb.part"
    part.unlink(missing_ok=True)
    try:
        found = store.download(part)
    except StorageError as exc:
        raise BackupError(str(exc)) from exc
    if not found:
        return f"no local data and no backup at {store.where}: starting empty"
    try:
        check_rdb(part)
    except BackupError:
        part.unlink(missing_ok=True)
        raise
    install_rdb(part, layout)
    return f"restored {store.where} into {layout.aof_dir} (the object is kept)"


class Backups:
    """Snapshot the running Redis and upload the snapshot."""

    def __init__(self, client: redis.Redis, store: ObjectStore, layout: DataLayout) -> None:
        # redis-py types replies as unions of sync/async results.
        self.redis: redis.Redis = client
        self.store = store
        self.layout = layout

    def backup(self, *, final: bool, timeout_s: float = 600.0) -> str:
        """Snapshot and upload; returns the snapshot's SHA-256.

        ``final``: pause writes first and leave them paused (Redis is about to stop).

        Raises:
            BackupError: Redis could not snapshot or the upload failed.
        """
        try:
            if final:
                self._final_snapshot(timeout_s)
            else:
                self._background_snapshot(timeout_s)
        except redis.exceptions.RedisError as exc:
            raise BackupError(f"snapshot failed: {exc}") from exc
        # A hard link keeps the bytes stable while a later BGSAVE renames a new dump.rdb in.
        upload = self.layout.directory / "backup-upload.rdb"
        upload.unlink(missing_ok=True)
        os.link(self.layout.rdb, upload)
        try:
            digest = self.store.upload(upload)
        except StorageError as exc:
            raise BackupError(str(exc)) from exc
        finally:
            upload.unlink(missing_ok=True)
        if not final:
            try:
                self.redis.set(LAST_BACKUP_KEY, repr(time.time()))
            except redis.exceptions.RedisError as exc:
                log.warning("backup uploaded, but recording its time failed: %s", exc)
        return digest

    def _final_snapshot(self, timeout_s: float) -> None:
        # Held writes wait until Redis stops and are then dropped unanswered (clients retry).
        redisreply.command(self.redis, "CLIENT", "PAUSE", int(timeout_s * 1000), "WRITE")
        started = time.monotonic()
        self.redis.save()
        log.info("final snapshot written in %.1fs (writes paused)", time.monotonic() - started)

    def _background_snapshot(self, timeout_s: float) -> None:
        before = int(self.redis.info("persistence").get("rdb_saves", 0))
        # SCHEDULE: if an AOF rewrite runs, Redis starts the save right after it.
        redisreply.command(self.redis, "BGSAVE", "SCHEDULE")
        deadline = time.monotonic() + timeout_s
        seen_running = False
        while True:
            info = self.redis.info("persistence")
            running = bool(info.get("rdb_bgsave_in_progress"))
            seen_running = seen_running or running
            if not running and int(info.get("rdb_saves", 0)) > before:
                return
            if seen_running and not running:
                raise BackupError("BGSAVE failed (rdb_last_bgsave_status is not ok; see Redis' log)")
            if time.monotonic() > deadline:
                raise BackupError(f"BGSAVE did not finish within {timeout_s:.0f}s")
            # A bounded poll of a background job, not a worker's wait.
            time.sleep(0.05)

    def resume_writes(self) -> None:
        """Undo the pause of a final backup (when Redis is not stopped after all)."""
        redisreply.command(self.redis, "CLIENT", "UNPAUSE")
