"""The answers of the API: JSON bodies (``{"uuid", "queue"}`` or ``{"error", "message"}``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from flask import Response


def json_answer(status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> Response:
    """A JSON response."""
    return Response(
        json.dumps(body, separators=(",", ":"), ensure_ascii=False),
        status=status,
        mimetype="application/json",
        headers=dict(headers or {}),
    )


def error_answer(
    status: int,
    rule: str,
    message: str,
    headers: Mapping[str, str] | None = None,
    *,
    details: Mapping[str, Any] | None = None,
) -> Response:
    """``{"error": <rule>, "message": <what is wrong>, **details}`` with ``status``."""
    return json_answer(status, {"error": rule, "message": message, **(details or {})}, headers)
