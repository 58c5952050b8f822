"""The API contract: ``openapi.yaml`` (next to this module), served as ``GET /v1/openapi.json``.

The document lists every operation and every answer HttpReceiver gives (send, one-click
unsubscribe, suppressions, trace).  ``tests/httpreceiver/test_contract.py`` validates it with
openapi-spec-validator and runs schemathesis against the app with it, so code and contract
cannot drift apart.  It is public: no credentials needed to read it.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Final

import yaml
from flask import Response

PATH: Final = Path(__file__).with_name("openapi.yaml")


@functools.cache
def document() -> dict[str, Any]:
    """The OpenAPI document (read once per process)."""
    loaded: dict[str, Any] = yaml.safe_load(PATH.read_text(encoding="utf-8"))
    return loaded


@functools.cache
def _body() -> bytes:
    return json.dumps(document(), separators=(",", ":"), ensure_ascii=False).encode()


def serve() -> Response:
    """``GET /v1/openapi.json``."""
    return Response(_body(), mimetype="application/json", headers={"Cache-Control": "public, max-age=300"})
