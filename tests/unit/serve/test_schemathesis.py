"""Schemathesis runs the served OpenAPI document against the live server: whatever it
generates, valid or not, no answer is a server error, and every answer matches the
document (status code, content type, body schema)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.serve import LiveServer, running_server
from worker.config.serve import ServeSettings
from worker.config.settings import ModelSettings, TaggingSettings
from worker.scoring.noop import NoopScorer

# Examples per operation: enough to reach every branch of the payload's schema (unions,
# optional parameters, extra fields) in a few seconds on a shared 2-core machine.
MAX_EXAMPLES = 150
COUNT = "tagstream_http_requests_total"
STATUSES = (200, 400, 404, 405, 413, 422, 429, 503)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    # Small limits, so that generated payloads reach them (413, 422 on every limit).
    serve = ServeSettings(serve_max_request_bytes=4096, serve_max_inputs=4)
    tagging = TaggingSettings(max_text_chars=200, max_labels=5, max_label_chars=20)
    with running_server(NoopScorer(ModelSettings()), serve=serve, tagging=tagging) as server:
        yield server


@pytest.fixture(scope="module")
def api(live: LiveServer) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{live.base_url}/openapi.json")


# schemathesis.pytest.from_fixture relies on a pytest internal that pytest 9 removed, so
# the document's strategy drives a plain Hypothesis test instead.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_generated_request_gets_a_server_error(
    mode: GenerationMode, api: schemathesis.BaseSchema, live: LiveServer
) -> None:
    @given(case=api.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    def run(case: Any) -> None:  # a schemathesis.Case
        case.call_and_validate(base_url=live.base_url, checks=CHECKS)

    run()
    for path in ("/v1/classify", "/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert any(live.sample(COUNT, {"path": path, "status": str(s)}) for s in STATUSES), path
    if mode is GenerationMode.POSITIVE:  # the generator reached the model, not only validation
        assert live.sample(COUNT, {"path": "/v1/classify", "status": "200"}) > 0
