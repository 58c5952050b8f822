"""The sender's control surface: the suppression list and message timelines over HTTP.

Same credentials as ``POST /v1/mail/send`` (HTTP Basic or a bearer API key, same lockout);
every answer is JSON except the exports.  Reads and writes ``IB:suppr:*``
(:mod:`common.suppression`) and reads ``IB:trace:<uuid>`` (:mod:`common.trace`).

==========================================================  =========================================
``GET /v1/suppressions``                                     list (``scope``, ``reason``, ``address``,
                                                             ``since`` filters; ``cursor``, ``limit``)
``GET /v1/suppressions/export?format=csv|jsonl``             every selected entry (same filters)
``POST /v1/suppressions/import``                             CSV (``text/csv``) or JSON lines
                                                             (``application/x-ndjson``)
``GET|PUT|DELETE /v1/suppressions/<scope>/<address>``        one address (``PUT`` body optional:
                                                             ``{"reason": "manual"}``)
``GET /v1/messages/<uuid>``                                  the timeline of one message
==========================================================  =========================================

``<scope>`` is the From domain (``common-config.suppression.scope: domain``) or the stream id
(``stream``).  Errors are ``{"error": <rule>, "message": …}``: 400 a bad parameter or body, 404
nothing there, 413 an import over ``max-message-size``, 415 an import of another type, 503
Redis unavailable (``Retry-After``).  The contract of every answer is ``openapi.yaml``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

import redis
from flask import Response, request

from common import trace
from common.addressing import valid_uuid
from common.suppression import (
    ADDRESS_CHARS,
    CSV_COLUMNS,
    REASONS,
    Entry,
    Filters,
    SuppressionList,
    parse_record,
    valid_address,
    valid_scope,
)
from common.trace import TraceSettings
from httpreceiver.responses import error_answer, json_answer

log = logging.getLogger(__name__)

#: Seconds a client should wait after a 503 (Redis restarting).
RETRY_AFTER_S: Final = 5
MAX_LIMIT: Final = 1000
#: Rows of an import written per Redis transaction.
IMPORT_CHUNK: Final = 500
#: Rejected rows reported back by an import (the count is always complete).
MAX_REPORTED_ERRORS: Final = 100
CSV_TYPES: Final = frozenset(("text/csv",))
JSONL_TYPES: Final = frozenset(("application/x-ndjson", "application/jsonl", "application/json-lines"))

Authenticate = Callable[[], "str | Response"]
#: An address filter: part of an address (the characters of an address, and ``@``).
_FILTER: Final = re.compile(f"[{ADDRESS_CHARS}@]+")


class BadRequest(ValueError):
    """A parameter or body the API refuses (400)."""


class ControlApi:
    """The views of one app instance."""

    def __init__(
        self,
        suppressions: SuppressionList,
        trace_settings: TraceSettings,
        authenticate: Authenticate,
        *,
        max_import_bytes: int,
    ) -> None:
        self.suppressions = suppressions
        self.trace = trace_settings
        self.authenticate = authenticate
        self.max_import_bytes = max_import_bytes

    # -- suppressions ----------------------------------------------------------------------

    def listing(self) -> Response:
        """``GET /v1/suppressions``."""
        return self._guarded(self._list)

    def _list(self) -> Response:
        filters = self._filters()
        limit = _int(request.args.get("limit"), "limit", 100, 1, MAX_LIMIT)
        cursor = request.args.get("cursor") or None
        if cursor is not None and not (cursor.isascii() and cursor.isdigit() and len(cursor) <= 19):
            raise BadRequest("cursor must be a value of next_cursor from an earlier page")
        page = self.suppressions.page(filters, cursor, limit)
        now = time.time()
        return json_answer(200, {"entries": [self._public(e, now) for e in page.entries], "next_cursor": page.cursor})

    def export(self) -> Response:
        """``GET /v1/suppressions/export``: every selected entry, CSV or JSON lines."""
        return self._guarded(self._export)

    def _export(self) -> Response:
        filters = self._filters()
        kind = request.args.get("format", "jsonl")
        if kind not in ("csv", "jsonl"):
            raise BadRequest("format must be csv or jsonl")
        # Read before answering: a Redis failure is a clean 503, never a truncated file.
        entries = list(self.suppressions.iterate(filters))
        if kind == "csv":
            return Response(_csv(entries), mimetype="text/csv", headers={"Cache-Control": "no-store"})
        lines = "".join(json.dumps(e.to_dict(), ensure_ascii=False) + "\n" for e in entries)
        return Response(lines, mimetype="application/x-ndjson", headers={"Cache-Control": "no-store"})

    def import_(self) -> Response:
        """``POST /v1/suppressions/import``."""
        return self._guarded(self._import)

    def _import(self) -> Response:
        kind = request.mimetype
        if kind not in CSV_TYPES | JSONL_TYPES:
            return error_answer(
                415, "content-type", "Content-Type must be text/csv or application/x-ndjson (JSON lines)"
            )
        length = request.content_length
        if length is not None and length > self.max_import_bytes:
            return _too_large(self.max_import_bytes)
        request.max_content_length = self.max_import_bytes + 1
        raw = request.get_data(cache=False)
        if len(raw) > self.max_import_bytes:
            return _too_large(self.max_import_bytes)
        default_scope = request.args.get("scope") or None
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise BadRequest("the body is not UTF-8") from None
        rows = _csv_rows(text) if kind in CSV_TYPES else _jsonl_rows(text)
        entries: list[Entry] = []
        errors: list[dict[str, Any]] = []
        rejected = 0
        for line, row in rows:
            try:
                if isinstance(row, str):
                    raise ValueError(row)
                entries.append(parse_record(row, default_scope))
            except ValueError as exc:
                rejected += 1
                if len(errors) < MAX_REPORTED_ERRORS:
                    errors.append({"line": line, "error": str(exc)})
        if rejected and not entries:
            first = errors[0]
            raise BadRequest(f"no valid row; line {first['line']}: {first['error']}")
        for start in range(0, len(entries), IMPORT_CHUNK):
            self.suppressions.store(entries[start : start + IMPORT_CHUNK])
        log.info("imported %d suppression entries (%d rows rejected)", len(entries), rejected)
        return json_answer(200, {"imported": len(entries), "rejected": rejected, "errors": errors})

    def one(self, scope: str, address: str) -> Response:
        """``GET|PUT|DELETE /v1/suppressions/<scope>/<address>``."""
        handlers = {"GET": self._get, "PUT": self._put, "DELETE": self._delete}
        view = handlers[request.method]
        return self._guarded(lambda: view(*_checked(scope, address)))

    def _get(self, scope: str, address: str) -> Response:
        entries = self.suppressions.get(scope, address)
        if not entries:
            return _not_listed(scope, address)
        now = time.time()
        return json_answer(
            200,
            {
                "scope": scope,
                "address": address,
                "suppressed": any(self.suppressions.enforced(e, now) for e in entries),
                "entries": [self._public(e, now) for e in entries],
            },
        )

    def _put(self, scope: str, address: str) -> Response:
        reason = "manual"
        raw = request.get_data(cache=True)
        if raw.strip():
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):  # RecursionError: [[[[…
                raise BadRequest('the body must be a JSON object such as {"reason": "manual"}') from None
            if not isinstance(body, dict) or set(body) - {"reason"}:
                raise BadRequest('the body must be a JSON object with at most "reason"')
            reason = body.get("reason", "manual")
            if reason not in REASONS:
                raise BadRequest(f"reason must be one of {', '.join(REASONS)}")
        entry = self.suppressions.put(scope, address, reason)
        log.info("suppression entry %s/%s (%s) added over the API", scope, "<address>", reason)
        return json_answer(200, self._public(entry, time.time()))

    def _delete(self, scope: str, address: str) -> Response:
        reason = request.args.get("reason")
        if reason is not None and reason not in REASONS:
            raise BadRequest(f"reason must be one of {', '.join(REASONS)}")
        deleted = self.suppressions.delete(scope, address, reason)
        if not deleted:
            return _not_listed(scope, address)
        log.info("%d suppression entries of a %s address deleted over the API", deleted, scope)
        return json_answer(200, {"scope": scope, "address": address, "deleted": deleted})

    # -- trace -----------------------------------------------------------------------------

    def message(self, uuid: str) -> Response:
        """``GET /v1/messages/<uuid>``: the timeline, or 404 when there is none."""
        return self._guarded(lambda: self._message(uuid))

    def _message(self, uuid: str) -> Response:
        if not valid_uuid(uuid):
            raise BadRequest("a uuid is [a-z0-9]+, at most 46 characters (the X-Uuid of a message)")
        entries = trace.read(self.suppressions.redis, uuid)
        if not entries:
            days = self.trace.ttl_s / 86400
            return error_answer(
                404,
                "unknown-message",
                f"no message with uuid {uuid} is known: never submitted, or its timeline expired "
                f"({days:g} days after its last event, common-config.trace.retention-days)"
                + ("" if self.trace.enabled else "; tracing is disabled (common-config.trace.enabled)"),
            )
        return json_answer(200, trace.timeline(uuid, entries, self.trace))

    # -- plumbing --------------------------------------------------------------------------

    def _guarded(self, view: Callable[[], Response]) -> Response:
        """Authenticate, run, and turn refusals and Redis failures into their answers."""
        user = self.authenticate()
        if isinstance(user, Response):
            return user
        try:
            return view()
        except BadRequest as exc:
            return error_answer(400, "bad-request", str(exc))
        except redis.exceptions.RedisError as exc:
            log.warning("control API answering 503: Redis unavailable: %s", exc)
            return error_answer(
                503,
                "unavailable",
                f"Redis is unavailable; retry in {RETRY_AFTER_S} s",
                {"Retry-After": str(RETRY_AFTER_S)},
            )

    def _filters(self) -> Filters:
        args = request.args
        scope = args.get("scope") or None
        reason = args.get("reason")
        address = args.get("address") or None
        if scope is not None and not valid_scope(scope):
            raise BadRequest("scope is not a domain or stream id")
        if reason is not None and reason not in REASONS:
            raise BadRequest(f"reason must be one of {', '.join(REASONS)}")
        if address is not None and (len(address) > 320 or not _FILTER.fullmatch(address)):
            raise BadRequest("address must be (part of) an address")
        since = args.get("since")
        stamp: float | None = None
        if since is not None:
            try:
                stamp = float(since)
            except ValueError:
                raise BadRequest("since must be Unix seconds") from None
            if not 0 <= stamp < 2**33:
                raise BadRequest("since must be Unix seconds")
        return Filters(scope, reason, address, stamp)

    def _public(self, entry: Entry, now: float) -> dict[str, Any]:
        return {**entry.to_dict(), "enforced": self.suppressions.enforced(entry, now)}


def _checked(scope: str, address: str) -> tuple[str, str]:
    address = address.lower()
    if not valid_scope(scope):
        raise BadRequest("the scope (From domain or stream id) is not valid")
    if not valid_address(address):
        raise BadRequest("not an email address")
    return scope, address


def _int(text: str | None, name: str, default: int, low: int, high: int) -> int:
    if text is None:
        return default
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        raise BadRequest(f"{name} must be a whole number from {low} to {high}")
    return int(text)


def _not_listed(scope: str, address: str) -> Response:
    return error_answer(404, "not-suppressed", f"{address} is not on the suppression list of {scope}")


def _too_large(limit: int) -> Response:
    return error_answer(413, "too-large", f"an import is at most {limit} bytes (httpreceiver.max-message-size)")


def _csv(entries: list[Entry]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for entry in entries:
        writer.writerow(entry.to_dict())
    return out.getvalue()


def _csv_rows(text: str) -> Iterator[tuple[int, dict[str, Any] | str]]:
    # newline="": the csv module sees the line ends itself (a bare CR inside a field is data).
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        if reader.fieldnames is None or not {"address", "email"} & {f.strip() for f in reader.fieldnames}:
            yield 1, "the first line must name the columns, at least address (and scope, reason, first, last…)"
            return
        for row in reader:
            yield reader.line_num, {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
    except csv.Error as exc:
        yield reader.line_num, f"not CSV: {exc}"


def _jsonl_rows(text: str) -> Iterator[tuple[int, dict[str, Any] | str]]:
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, f"not JSON: {exc.msg}"
            continue
        except RecursionError:
            yield number, "not JSON: nested too deeply"
            continue
        yield number, value if isinstance(value, dict) else "not a JSON object"
