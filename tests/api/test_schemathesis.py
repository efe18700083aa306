"""The server against its own OpenAPI document: schemathesis generates requests for every operation
(valid ones and invalid ones) and checks that no answer is a 5xx and that every answer fits the
document (status code, content type, body schema).

Each operation's cases are driven with hypothesis here rather than through schemathesis's pytest
plugin, whose fixture loader does not run under this project's pytest (9.x).
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from conchdb.api import ApiSettings, create_app

CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance, content_type_conformance]
EXAMPLES = 20


@pytest.fixture(scope="module")
def api_schema(searcher):
    app = create_app(searcher, ApiSettings(max_upload_bytes=2_000_000, max_pixels=4_000_000))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_the_document_lists_every_endpoint(api_schema):
    paths = set(api_schema.raw_schema["paths"])
    assert {"/v1/search/text", "/v1/search/image", "/v1/describe", "/v1/classify", "/v1/tiles/{point_id}.jpg",
            "/v1/slides", "/v1/slides/{slide_id}", "/v1/slides/{slide_id}/thumbnail.jpg",
            "/v1/slides/{slide_id}/heatmap.png", "/v1/slides/{slide_id}.dzi", "/v1/health", "/v1/stats",
            "/v1/search/refine", "/v1/slides/{slide_id}/hits.geojson"} <= paths


def _checker(operation, mode, seen: set[int]):
    """A hypothesis test of one operation that records the statuses it saw."""

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case) -> None:
        seen.add(case.call_and_validate(checks=CHECKS).status_code)

    return check


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_the_server_keeps_to_its_openapi_document(api_schema, mode):
    failures: list[str] = []
    statuses: dict[str, set[int]] = {}
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 14
    for operation in operations:
        check = _checker(operation, mode, statuses.setdefault(operation.path, set()))
        try:
            check()
        except Unsatisfiable:  # an operation without inputs (health, stats) has no invalid request
            assert mode == GenerationMode.NEGATIVE, operation.path
        except Exception as exc:  # every operation is tried; the failures are reported together
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    assert not failures, "\n\n".join(failures)
    if mode == GenerationMode.POSITIVE:  # valid requests did reach the search, not only the validation
        assert 200 in statuses["/v1/search/text"] and 200 in statuses["/v1/slides"]
    else:
        assert 422 in statuses["/v1/search/text"]
