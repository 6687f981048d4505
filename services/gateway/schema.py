"""The OpenAPI description of the HTTP API: the request bodies are the validator's own pydantic
models (`openai/models.py`), so the document and the validation cannot disagree; a
schema-driven fuzzer checks both directions of "invalid in, 4xx out". Cross-field rules and
bounds set by flags (the context length, `stream_options` needing `stream`, `best_of` equal to
`n`, the number of stop strings, token ids inside the vocabulary) are checked after the models,
in `openai/parse.py`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from disagg.services.gateway.openai.models import ChatCompletionRequest, CompletionRequest

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
ERROR_STATUSES = {
    "400": "bad field, or prompt longer than the context",
    "401": "missing or wrong API key",
    "404": "unknown model",
    "413": "body over the size limit",
    "429": "at capacity (see Retry-After)",
    "503": "no worker of a role, or draining (see Retry-After)",
    "504": "a bounded wait ran out",
}


def error_responses(*statuses: str) -> dict[str, Any]:
    """OpenAPI `responses` entries with the OpenAI error body."""
    content = {"application/json": {"schema": ERROR_SCHEMA}}
    return {s: {"description": ERROR_STATUSES[s], "content": content} for s in statuses}


def generation_route(model: type[BaseModel], served: tuple[str, ...]) -> dict[str, Any]:
    """`openapi_extra` of a generation route: its request body and every response it sends."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    schema["properties"]["model"] = {
        "anyOf": [{"type": "string", "enum": list(served)}, {"type": "null"}]
    }
    ok = {
        "description": "the response, or with stream=true server-sent events",
        "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {}},
    }
    errors = error_responses("400", "401", "404", "413", "429", "503", "504")
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
        "responses": {"200": ok} | errors,
    }


def component_schemas() -> dict[str, Any]:
    """The nested models the request bodies refer to."""
    defs: dict[str, Any] = {}
    for model in (CompletionRequest, ChatCompletionRequest):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        defs |= schema.get("$defs", {})
    return defs
