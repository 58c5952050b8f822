"""The answers of the API: JSON bodies (``{"uuid", "queue"}`` or ``{"error", "message"}``).

:class:`Answer` is the framework-free form (the send endpoint answers from the event loop,
:mod:`httpreceiver.front`); :func:`json_answer` and :func:`error_answer` give the Flask responses
of the other endpoints, with the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flask import Response

from common.events import Event, error_event


@dataclass(frozen=True)
class Answer:
    """A JSON answer: status, body and extra headers."""

    status: int
    body: Mapping[str, Any]
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def error(
        cls,
        status: int,
        rule: str,
        message: str,
        headers: Mapping[str, str] | None = None,
        *,
        details: Mapping[str, Any] | None = None,
    ) -> Answer:
        """``{"error": <rule>, "message": <what is wrong>, **details}`` with ``status``."""
        return cls(status, {"error": rule, "message": message, **(details or {})}, dict(headers or {}))

    def encoded(self) -> bytes:
        """The body as compact UTF-8 JSON."""
        return json.dumps(self.body, separators=(",", ":"), ensure_ascii=False).encode()

    def flask(self) -> Response:
        """The same answer as a Flask response."""
        return Response(self.encoded(), status=self.status, mimetype="application/json", headers=dict(self.headers))


def internal_error() -> Answer:
    """The answer to a request that raised (a bug), wherever it was handled."""
    return Answer.error(500, "internal-error", "unexpected error; retry (with the same Idempotency-Key)")


def bug_event(exc: BaseException | None) -> Event:
    """The ``error`` event that tells the customer of a bug (as the original did)."""
    what = f"{type(exc).__name__}: {exc}" if exc is not None else "internal error"
    return error_event("http-receiver", what[:300])


def json_answer(status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> Response:
    """A JSON response."""
    return Answer(status, body, dict(headers or {})).flask()


def error_answer(
    status: int,
    rule: str,
    message: str,
    headers: Mapping[str, str] | None = None,
    *,
    details: Mapping[str, Any] | None = None,
) -> Response:
    """``{"error": <rule>, "message": <what is wrong>, **details}`` with ``status``."""
    return Answer.error(status, rule, message, headers, details=details).flask()
