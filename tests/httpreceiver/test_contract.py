"""The published API contract: valid OpenAPI 3.1, and what the running app answers.

``HttpReceiver/httpreceiver/openapi.yaml`` is checked with openapi-spec-validator, then
schemathesis generates requests for every operation from it (valid and invalid parameters,
bodies, missing credentials) and runs them against the app on the test Redis: every answer must
be documented (status code, content type, headers, body schema), none may be a server error.
"""

from __future__ import annotations

from typing import Any, cast

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from openapi_spec_validator import validate
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from httpreceiver import contract

from .conftest import AppUnderTest, basic

pytestmark = pytest.mark.redis

#: Operations whose valid-per-schema data is still refused by rules a schema cannot express (an
#: RFC 5322 message in a binary body, CSV rows, an unsubscribe token's HMAC).
#: Every operation but GET /v1/openapi.json (schemathesis does not test the document it reads).
OPERATIONS = 10
SEMANTIC_BODIES = {"POST /v1/mail/send", "POST /v1/suppressions/import", "POST /unsubscribe/{token}"}


def test_the_document_is_valid_openapi_3_1() -> None:
    document = contract.document()
    validate(document)
    assert document["openapi"] == "3.1.0"
    paths = document["paths"]
    assert {"/v1/mail/send", "/v1/suppressions", "/v1/suppressions/{scope}/{address}", "/v1/messages/{uuid}"} <= set(
        paths
    )
    # Every status the send endpoint can answer (the README's table) is in the contract.
    assert set(paths["/v1/mail/send"]["post"]["responses"]) >= {
        "200",
        "400",
        "401",
        "409",
        "413",
        "415",
        "422",
        "429",
        "503",
    }


def test_the_app_serves_the_document(hr: AppUnderTest) -> None:
    reply = hr.client.get("/v1/openapi.json")
    assert reply.status_code == 200 and reply.json == contract.document()


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_the_app_answers_as_the_contract_says(make_app, mode: GenerationMode) -> None:
    # No lockout: schemathesis sends wrong credentials on purpose (the lockout has its own tests).
    app = make_app({"auth-lockout": {"lockout-seconds": 0}}).app
    schema = schemathesis.openapi.from_wsgi("/v1/openapi.json", app)
    operations = [cast(Any, result).ok() for result in schema.get_all_operations()]
    assert len(operations) == OPERATIONS, sorted(op.label for op in operations)
    exercised = [operation.label for operation in operations if _exercise(operation, mode)]
    # Negative data cannot be made for every operation (a free-form string path parameter).
    assert len(exercised) >= (OPERATIONS if mode is GenerationMode.POSITIVE else 6), exercised


def _exercise(operation: Any, mode: GenerationMode) -> bool:
    """Run generated requests of one operation; False when none can be generated in this mode."""
    excluded = [positive_data_acceptance] if operation.label in SEMANTIC_BODIES else []

    @given(case=operation.as_strategy(mode))
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case: Any) -> None:
        case.call_and_validate(headers={"Authorization": basic()}, excluded_checks=excluded)

    try:
        check()
    except Unsatisfiable:
        if mode is GenerationMode.POSITIVE:
            raise
        return False
    return True
