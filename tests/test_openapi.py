"""`/openapi.json` is a valid OpenAPI 3.1 document that matches Flask's routes, both ways."""

from __future__ import annotations

import re

from openapi_spec_validator import validate
from redis import Redis

from api import create_app

SKIPPED = ("/static/", "/admin/rq")
"""Flask's static files and rq-dashboard's pages are not part of the API."""


def test_document_matches_every_route(redis: Redis, settings) -> None:  # type: ignore[no-untyped-def]
    app = create_app(settings(), redis)
    document = app.test_client().get("/openapi.json").get_json()
    validate(document)  # raises on an invalid document
    routes = {
        (re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule), method.lower())
        for rule in app.url_map.iter_rules()
        if not rule.rule.startswith(SKIPPED)
        for method in rule.methods - {"HEAD", "OPTIONS"}  # type: ignore[operator]
    }
    documented = {(path, method) for path, ops in document["paths"].items() for method in ops}
    assert routes - documented == set(), "routes missing from /openapi.json"
    assert documented - routes == set(), "documented operations that do not exist"


def test_errors_and_bodies_are_described(redis: Redis, settings) -> None:  # type: ignore[no-untyped-def]
    document = create_app(settings(), redis).test_client().get("/openapi.json").get_json()
    schemas = document["components"]["schemas"]
    submit = document["paths"]["/v1/jobs"]["post"]
    assert submit["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/JobSubmission"
    }
    assert {"priority", "deadline", "cancel_after", "webhook", "messages"} <= set(
        schemas["JobSubmission"]["properties"]
    )
    for code in ("400", "401", "404", "409", "413", "422", "429", "503"):
        assert submit["responses"][code]["content"]["application/json"]["schema"]["$ref"].endswith(
            "ErrorResponse"
        )
    assert "410" in document["paths"]["/v1/jobs/{job_id}"]["get"]["responses"]
    chat = document["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert set(chat) == {"application/json", "text/event-stream"}
    assert "reasoning_content" in schemas["AssistantMessage"]["properties"]


def test_tool_calls_are_described(redis: Redis, settings) -> None:  # type: ignore[no-untyped-def]
    document = create_app(settings(), redis).test_client().get("/openapi.json").get_json()
    schemas = document["components"]["schemas"]
    assert {"tools", "tool_choice", "parallel_tool_calls"} <= set(
        schemas["ChatCompletionRequest"]["properties"]
    )
    assert {"tools", "tool_choice", "parallel_tool_calls"} <= set(schemas["JobSubmission"]["properties"])
    assert {"tool_calls", "tool_call_id"} <= set(schemas["OpenAIMessage"]["properties"])
    assert "tool_calls" in schemas["AssistantMessage"]["properties"]
    assert "tool_calls" in schemas["Delta"]["properties"] and "DeltaToolCall" in schemas
    assert "tool_calls" in schemas["JobResult"]["properties"]
    assert "tool_calls" in str(schemas["JobResult"]["properties"]["finish_reason"])
    errors = document["paths"]["/v1/chat/completions"]["post"]["responses"]["422"]["description"]
    assert "tools_unsupported" in errors and "unknown_tool_call_id" in errors
