"""Follow Postfix' maillog file and turn it into events on ``EVENT_QUEUE``.

Produces ``delivered``/``bounce``/``deferred`` events (see :mod:`postfixlog.interpreter`) and
an ``attempt`` entry in the message's timeline (``IB:trace:<uuid>``, :mod:`common.trace`) for
every status line, in the same script call.

Exactly once: the follower reads a chunk of complete lines, and writes the chunk's events, its
record updates and the new position (``IB:postfixlog:position:<instance>``) in one MULTI/EXEC.  After a
crash it resumes from the saved position: no line is skipped, none is used twice.

The position is (inode, offset, fingerprint of the file's first line), so the follower notices

* rotation (the path names a new file): it finishes the old file through its open descriptor
  -- or, after a restart, through ``postfix.log.1`` -- then continues with the new one;
* truncation (the file became shorter than the offset): it starts again at offset 0;
* a new file (new instance directory, lost rotation): it starts at offset 0, with a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Final, Protocol

import redis

from common import keys as common_keys
from common import logs, redisreply
from common.bouncerules import Rules
from common.errors import TemporaryError
from common.queue import redis_errors
from common.retry import RetryPolicy
from common.trace import DISABLED, TraceSettings
from postfixlog import records
from postfixlog.interpreter import Effects, Interpreter
from postfixlog.logparser import Line, parse
from postfixlog.records import Delivery, Position

log = logging.getLogger(__name__)

FINGERPRINT_BYTES: Final = 512
#: How often the end of the log is checked for new lines: a delivery's event waits half of it
#: on average; an idle check is one read() that returns nothing.
POLL_SECONDS: Final = 0.02
#: Waits after a failed step (Redis down, an unexpected error): 1 s, doubling up to 10 s.
_RETRY: Final = RetryPolicy(base_s=1.0, cap_s=10.0)


def fingerprint(first_line: bytes) -> str:
    """Short digest identifying a log file by its first line (time stamp, pid, path)."""
    return hashlib.sha1(first_line).hexdigest()[:16] if first_line else ""


class LogReader:
    """Complete lines of a log file that Postfix appends to and that may be rotated.

    Not thread-safe: used by the follower's thread only.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO | None = None
        self.inode = 0
        self.offset = 0
        self._fingerprint = ""

    @property
    def position(self) -> Position:
        """Where the next unread line starts."""
        return Position(self.inode, self.offset, self._fingerprint_now())

    def restore(self, saved: Position | None) -> None:
        """Continue from ``saved`` (or start at the beginning of the current file)."""
        self.close()
        if saved is not None:
            for candidate in (self.path, self.rotated_path):
                if self._matches(candidate, saved):
                    self._open(candidate, saved.offset)
                    if candidate != self.path:
                        log.info("finishing rotated log %s from offset %d", candidate, saved.offset)
                    return
            if self.path.exists():
                log.warning(
                    "log file %s is not the one the saved position refers to (inode %d, offset %d); "
                    "reading it from its beginning",
                    self.path,
                    saved.inode,
                    saved.offset,
                )
        if self.path.exists():
            self._open(self.path, 0)

    @property
    def rotated_path(self) -> Path:
        """Where :meth:`postfixlog.instance.PostfixInstance.rotate_log` moves the log."""
        return self.path.with_name(self.path.name + ".1")

    def _matches(self, path: Path, saved: Position) -> bool:
        try:
            st = path.stat()
        except OSError:
            return False
        if st.st_ino != saved.inode or st.st_size < saved.offset:
            return False
        return not saved.fingerprint or fingerprint(self._first_line(path)) == saved.fingerprint

    @staticmethod
    def _first_line(path: Path) -> bytes:
        with contextlib.suppress(OSError), path.open("rb") as f:
            head = f.read(FINGERPRINT_BYTES)
            end = head.find(b"\n")
            return head[: end + 1] if end >= 0 else b""
        return b""

    def _open(self, path: Path, offset: int) -> None:
        self.close()
        self._file = path.open("rb")
        st = os.fstat(self._file.fileno())
        self.inode = st.st_ino
        self.offset = offset
        self._fingerprint = ""

    def _fingerprint_now(self) -> str:
        if not self._fingerprint and self._file is not None:
            self._file.seek(0)
            head = self._file.read(FINGERPRINT_BYTES)
            end = head.find(b"\n")
            if end >= 0:
                self._fingerprint = fingerprint(head[: end + 1])
        return self._fingerprint

    def close(self) -> None:
        """Close the current file."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def read(self, max_bytes: int) -> tuple[list[bytes], int]:
        """Complete lines after the current offset and the offset after them.

        The offset is not moved: call :meth:`advance` once the lines are handled.  Handles
        rotation and truncation when there is nothing new.
        """
        if self._file is None:
            if not self.path.exists():
                return [], self.offset
            self._open(self.path, 0)
        assert self._file is not None
        self._file.seek(self.offset)
        data = self._file.read(max_bytes)
        cut = data.rfind(b"\n")
        if cut >= 0:
            return data[: cut + 1].splitlines(), self.offset + cut + 1
        if len(data) >= max_bytes:
            log.warning("log line longer than %d bytes at offset %d skipped", max_bytes, self.offset)
            return [], self.offset + len(data)
        if self._follow_file_changes():
            return self.read(max_bytes)
        return [], self.offset

    def advance(self, offset: int) -> None:
        """Mark everything before ``offset`` as handled."""
        self.offset = offset

    def _follow_file_changes(self) -> bool:
        """Handle truncation and rotation at the end of the file; True when reading moved."""
        assert self._file is not None
        size = os.fstat(self._file.fileno()).st_size
        if size < self.offset:
            log.warning("log file %s was truncated (%d < %d); reading it from the start", self.path, size, self.offset)
            self.offset = 0
            self._fingerprint = ""
            return True
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return False  # rotated, new file not created yet
        if st.st_ino != self.inode and st.st_size > 0:
            # Postfix writes to the new file now, so the old one is complete: switch.
            if size > self.offset:
                log.warning("incomplete last line of the rotated log dropped (%d bytes)", size - self.offset)
            log.info("log file %s was rotated; following the new file", self.path)
            self._open(self.path, 0)
            return True
        return False

    def at_end(self) -> bool:
        """True when the current file is the path's file and everything in it was read."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return self._file is None or os.fstat(self._file.fileno()).st_size <= self.offset
        return st.st_ino == self.inode and st.st_size <= self.offset

    def size(self) -> int:
        """Current size of the file at the path (0 when missing)."""
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0


class FollowerMetrics(Protocol):
    """Hooks the follower calls (implemented by :class:`postfixlog.metrics.PostfixLogMetrics`)."""

    def count(self, effects: Effects) -> None:
        """Count lines and events of a committed chunk."""

    def lag(self, unread_bytes: int) -> None:
        """Bytes of log not read yet."""


class _NoMetrics:
    def count(self, effects: Effects) -> None:
        """Ignore."""

    def lag(self, unread_bytes: int) -> None:
        """Ignore."""


class LogFollower:
    """The follower thread: read, interpret, commit, repeat."""

    def __init__(
        self,
        reader: LogReader,
        client: redis.Redis,
        *,
        event_queue: str,
        instance_name: str,
        qid_ttl_s: int,
        position_ttl_s: int = records.POSITION_TTL_S,
        metrics: FollowerMetrics | None = None,
        observer: Callable[[Effects], None] | None = None,
        rotate: Callable[[], object] | None = None,
        rotate_bytes: int = 0,
        chunk_bytes: int = 1 << 20,
        poll_s: float = POLL_SECONDS,
        trace_settings: TraceSettings = DISABLED,
        rules: Rules | None = None,
    ) -> None:
        self.reader = reader
        self.redis: redis.Redis = client
        self.event_queue = event_queue
        self.instance_name = instance_name
        self.qid_ttl_s = qid_ttl_s
        self.position_ttl_s = position_ttl_s
        self.metrics: FollowerMetrics = metrics or _NoMetrics()
        #: Called with every committed chunk's effects (the shaper counts providers' replies).
        self.observer = observer
        self.rotate = rotate
        self.rotate_bytes = rotate_bytes
        self.chunk_bytes = chunk_bytes
        self.poll_s = poll_s
        self.trace = trace_settings
        self.interpreter = Interpreter(rules)
        self.last_progress = time.monotonic()
        self._progress = threading.Condition()
        self._draining = threading.Event()
        self._thread: threading.Thread | None = None
        self._restored = False
        self._commit_script = client.register_script(records.COMMIT_SCRIPT)

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Run in a background thread."""
        self._thread = threading.Thread(target=self.run, name="log-follower", daemon=True)
        self._thread.start()

    def drain(self, timeout_s: float) -> bool:
        """Read to the end of the log (Postfix is stopped), then stop; True when complete."""
        self._draining.set()
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        """True while the thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def run(self) -> None:
        """Loop until stopped (SIGTERM leaves it running until :meth:`drain`)."""
        failures = 0
        while True:
            try:
                if not self._restored:
                    self._restore()
                worked = self.step()
                failures = 0
            except TemporaryError as exc:
                failures += 1
                log.warning("log follower: %s; retrying", exc)
                time.sleep(_RETRY.delay(failures))
                continue
            except Exception:  # the follower thread must survive any bad line or bug (logged)
                failures += 1
                log.exception("log follower failed; retrying")
                time.sleep(_RETRY.delay(failures))
                continue
            if not worked:
                if self._draining.is_set():
                    log.info("log follower drained the log at %s offset %d", self.reader.path, self.reader.offset)
                    self.reader.close()
                    return
                time.sleep(self.poll_s)

    def _restore(self) -> None:
        key = records.position_key(self.instance_name)
        with redis_errors("read the log position"):
            raw = self.redis.get(key)
            if raw is None:
                raw = self._move_legacy_position(key)
        saved = Position.decode(raw)
        self.reader.restore(saved)
        self._restored = True
        log.info("following %s from offset %d", self.reader.path, self.reader.offset)

    def _move_legacy_position(self, key: str) -> bytes | None:
        """The position a PostfixLog before 2.1 saved in one shared hash, moved to ``key``."""
        raw = redisreply.optional_bytes(self.redis.hget(records.LEGACY_POSITION_KEY, self.instance_name))
        if raw is not None:
            pipe = self.redis.pipeline(transaction=True)
            pipe.set(key, raw, ex=self.position_ttl_s)
            pipe.hdel(records.LEGACY_POSITION_KEY, self.instance_name)
            pipe.execute()
            log.info("moved the log position of %s to %s", self.instance_name, key)
        return raw

    # -- one step --------------------------------------------------------------------------

    def step(self) -> bool:
        """Handle the next chunk of lines; False when there was nothing new."""
        raw_lines, end = self.reader.read(self.chunk_bytes)
        if not raw_lines:
            if end != self.reader.offset:
                self.reader.advance(end)
                return True
            self._maybe_rotate()
            self._notify()
            return False
        lines = [parse(raw.decode("utf-8", "replace")) for raw in raw_lines]
        effects = self._interpret(lines)
        self._commit(effects, end)
        self.reader.advance(end)
        self.last_progress = time.monotonic()
        self.metrics.count(effects)
        self.metrics.lag(max(self.reader.size() - end, 0))
        self._notify()
        return True

    def _interpret(self, lines: list[Line]) -> Effects:
        tokens, qids = self.interpreter.needs(lines)
        tx_records = self._fetch(records.tx_key, tokens)
        # A queue id introduced by a client= line needs its own record only when the injection
        # record is already gone (then the injector's record after 250 is the one to use).
        introduced = {line.queue_id: line.token for line in lines if line.kind == "client" and line.token}
        wanted = {q for q in qids if q not in introduced or tx_records.get(introduced[q] or "") is None}
        qid_records = self._fetch(self._qid_key, wanted)
        missing = {q for q, record in qid_records.items() if record is None}
        if missing:  # written before 2.1, when queue ids were not per instance
            qid_records.update({q: r for q, r in self._fetch(records.legacy_qid_key, missing).items() if r})
        return self.interpreter.apply(lines, tx_records, qid_records)

    def _qid_key(self, queue_id: str) -> str:
        return records.qid_key(self.instance_name, queue_id)

    def _fetch(self, key: Callable[[str], str], names: set[str]) -> dict[str, Delivery | None]:
        if not names:
            return {}
        ordered = sorted(names)
        with redis_errors("read delivery records"):
            pipe = self.redis.pipeline(transaction=False)
            for name in ordered:
                pipe.hgetall(key(name))
            replies = pipe.execute()
        return {name: Delivery.from_hash(reply) for name, reply in zip(ordered, replies, strict=True)}

    def _commit(self, effects: Effects, end: int) -> None:
        """Events, record updates and the new position in one atomic script call."""
        position = Position(self.reader.inode, end, self.reader.position.fingerprint)
        keys = [self.event_queue, records.position_key(self.instance_name)]

        def key(name: str) -> int:
            keys.append(name)
            return len(keys)  # Lua indexes from 1

        change = {
            "link": [[key(records.tx_key(token)), fields["qid"]] for token, fields in effects.tx_updates.items()],
            "set": [
                [key(self._qid_key(qid)), [x for pair in fields.items() for x in pair]]
                for qid, fields in effects.qid_updates.items()
            ],
            "del": [key(self._qid_key(qid)) for qid in sorted(effects.qid_deletes)],
            "events": [event.to_json().decode() for event in effects.events],
            "traces": [[key(common_keys.trace(uuid)), step] for uuid, step in effects.traces]
            if self.trace.enabled
            else [],
            "pos": position.encode(),
        }
        args: list[str | int] = [
            json.dumps(change, separators=(",", ":")),
            self.qid_ttl_s,
            self.position_ttl_s,
            self.trace.ttl_s,
            self.trace.max_entries,
        ]
        with redis_errors("commit log events"):
            self._commit_script(keys=keys, args=args)
        for event in effects.events:
            log.info(
                "%s uuid=%s status=%s%s",
                event.event,
                event.uuid,
                event.status,
                f" type={event.type} classification={event.classification}" if event.type else "",
                extra=logs.fields(
                    uuid=event.uuid, recipient=event.recipient, event_id=event.event_id, stream_id=event.stream_id
                ),
            )
        if self.observer is not None:
            self.observer(effects)

    def _maybe_rotate(self) -> None:
        if not self.rotate or not self.rotate_bytes or self._draining.is_set():
            return
        if self.reader.at_end() and self.reader.size() >= self.rotate_bytes:
            log.info("rotating %s at %d bytes", self.reader.path, self.reader.size())
            self.rotate()

    # -- waiting for the follower ----------------------------------------------------------

    def _notify(self) -> None:
        with self._progress:
            self._progress.notify_all()

    def wait_caught_up(self, timeout_s: float) -> bool:
        """Wait until every line written so far is handled; True on success."""
        target_size = self.reader.size()
        try:
            target_inode = self.reader.path.stat().st_ino
        except FileNotFoundError:
            return True
        deadline = time.monotonic() + timeout_s
        with self._progress:
            while not (self.reader.inode == target_inode and self.reader.offset >= target_size):
                left = deadline - time.monotonic()
                if left <= 0 or not self.alive:
                    return False
                self._progress.wait(min(left, 0.2))
        return True
