"""Hold events to their published JSON Schema (``common/common/contracts/events.schema.json``).

Used by the webhook receiver of the local stack and of the end-to-end tests
(:class:`devtools.webhook.WebhookReceiver` with ``validate=True``) and by the unit tests: an
event with a field the schema does not list, a missing field or a wrong type is a violation,
so no undocumented field can reach customers unnoticed.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

import jsonschema

from common.events import SCHEMA_PATH


@functools.cache
def event_schema() -> dict[str, Any]:
    """The published schema."""
    loaded: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return loaded


@functools.cache
def _validators() -> dict[str, jsonschema.protocols.Validator]:
    schema = event_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    out: dict[str, jsonschema.protocols.Validator] = {}
    for kind in schema["$defs"]:
        sub = {"$ref": f"#/$defs/{kind}", "$defs": schema["$defs"]}
        out[kind] = jsonschema.Draft202012Validator(sub)
    return out


def event_problems(event: Mapping[str, Any]) -> list[str]:
    """What is wrong with one event (empty when it conforms), one line per problem."""
    validators = _validators()
    kind = event.get("event")
    if not isinstance(kind, str) or kind not in validators:
        return [f"event type {kind!r} is not one of {', '.join(sorted(validators))}"]
    problems = []
    for error in sorted(validators[kind].iter_errors(dict(event)), key=lambda e: list(e.path)):
        where = "/".join(str(p) for p in error.path) or "(event)"
        problems.append(f"{kind} {where}: {error.message}")
    return problems
