"""Schema fuzzing (schemathesis) of the live API's OpenAPI description.

Every generated request must get an answer whose status, content type and body the description
documents, and none may be a server error. (Schema-valid is not always acceptable here: "AAAA" is
valid base64 but not an image, so a 400 for it is right.) The one 5xx the API is designed to give for a well-formed request, 503 for a
model no worker serves, is accepted only with that error code.

The operations are driven through Hypothesis directly (``APIOperation.as_strategy``): schemathesis'
pytest plugin does not run under pytest 9.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, status_code_conformance

from tests.support.stack import Stack

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)


def _fuzz(operation: schemathesis.APIOperation, tried: dict[str, int]) -> None:
    @FUZZ
    @given(case=operation.as_strategy())
    def check(case: schemathesis.Case) -> None:
        response = case.call(timeout=60)
        tried[operation.label] = tried.get(operation.label, 0) + 1
        if response.status_code >= 500:
            assert response.status_code == 503 and response.json()["error"]["code"] == "model_not_served", (operation.label, response.text)
        case.validate_response(response, checks=[status_code_conformance, content_type_conformance, response_schema_conformance])

    check()


def test_no_server_errors(service: Stack) -> None:
    schema = schemathesis.openapi.from_url(f"{service.base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    tried: dict[str, int] = {}
    for operation in operations:
        _fuzz(operation, tried)
    print(tried)
