"""The eml directory: unclassified mail kept for a human, bounded in count and size.

Each mail is written to ``<time ns>-<pid>-<random>.eml`` (unique across restarts and
replicas sharing the directory; the original used a counter that restarted at 1 and
overwrote files), through a temporary name, ``fsync``'d and renamed, so a reply of ``250``
means the file is on disk.  After each write the oldest files are removed until at most
``max_files`` files and ``max_bytes`` bytes remain; the newest file is always kept.
"""

from __future__ import annotations

import collections
import logging
import os
import secrets
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

SUFFIX = ".eml"


class EmlStore:
    """Writes unclassified mail and keeps the directory within its bounds (thread-safe)."""

    def __init__(self, directory: Path, max_files: int, max_bytes: int) -> None:
        self.directory = directory
        self.max_files = max_files
        self.max_bytes = max_bytes
        self._files: collections.deque[tuple[str, int]] = collections.deque()
        self._bytes = 0
        self._lock = threading.Lock()

    def open(self) -> EmlStore:
        """Create the directory if needed and index the files already there (oldest first).

        Raises:
            OSError: the directory cannot be created or read.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        found = []
        for entry in os.scandir(self.directory):
            if entry.name.startswith(".tmp-"):
                _unlink(Path(entry.path))  # left by a crash before the rename
            elif entry.name.endswith(SUFFIX) and entry.is_file():
                stat = entry.stat()
                found.append((stat.st_mtime_ns, entry.name, stat.st_size))
        with self._lock:
            self._files = collections.deque((name, size) for _, name, size in sorted(found))
            self._bytes = sum(size for _, size in self._files)
            self._trim()
        log.info("eml directory %s holds %d files, %d bytes", self.directory, len(self._files), self._bytes)
        return self

    @property
    def count(self) -> int:
        """Files in the directory (as indexed)."""
        return len(self._files)

    @property
    def total_bytes(self) -> int:
        """Their total size."""
        return self._bytes

    def save(self, data: bytes) -> Path:
        """Write one mail durably; returns its path.

        Raises:
            OSError: the file could not be written (disk full, permissions).
        """
        name = f"{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}{SUFFIX}"
        final = self.directory / name
        temp = self.directory / f".tmp-{name}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.rename(temp, final)
        except OSError:
            _unlink(temp)
            raise
        _fsync_directory(self.directory)
        with self._lock:
            self._files.append((name, len(data)))
            self._bytes += len(data)
            self._trim()
        return final

    def _trim(self) -> None:
        while len(self._files) > 1 and (len(self._files) > self.max_files or self._bytes > self.max_bytes):
            name, size = self._files.popleft()
            self._bytes -= size
            _unlink(self.directory / name)
            log.info("eml directory over its bounds: removed %s", name)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
