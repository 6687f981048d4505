"""The OpenAPI description of the HTTP API, for documentation and schema-driven tests only.

Validation stays in `openai/` (strict, with OpenAI error bodies): these pydantic models are never
used to parse a request. They describe a superset of what the validator accepts — any body they
reject, the validator rejects too — so a schema-driven fuzzer can check both directions of
"invalid in, 4xx out". Cross-field rules and bounds set by flags (the context length,
`stream_options` needing `stream`, `best_of` equal to `n`, the number of stop strings, token ids
inside the vocabulary) are the validator's alone.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from disagg.services.gateway.openai.request import ROLES, SEED_MAX, SEED_MIN
from disagg.shared.protocol.sampling import MAX_LOGPROBS

NonNegativeTemp = Annotated[float, Field(ge=0.0, le=2.0)]
StopString = Annotated[str, Field(min_length=1)]
TokenId = Annotated[int, Field(ge=0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
TopN = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]
MAX_CHOICES = 16


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are ignored, as vLLM does


class StreamOptions(_Body):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class _Common(_Body):
    model: str | None = Field(None, description="a served model (GET /v1/models)")
    temperature: NonNegativeTemp | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] | None = None
    best_of: Annotated[int, Field(ge=1, le=MAX_CHOICES)] | None = None
    stop: StopString | list[StopString] | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=64)] | None = None
    ignore_eos: bool | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    allowed_token_ids: Annotated[list[TokenId], Field(min_length=1)] | None = None
    bad_words: list[Annotated[str, Field(min_length=1)]] | None = None
    prompt_logprobs: TopN | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    return_token_ids: bool | None = None


TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class CompletionRequest(_Common):
    """POST /v1/completions: a prompt (text or token ids), or a list of them (one choice each)."""

    prompt: (
        Annotated[str, Field(min_length=1)]
        | TokenIds
        | Annotated[
            list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_CHOICES)
        ]
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_CHOICES)]
    )
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    echo: bool | None = None
    logprobs: TopN | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal[ROLES]
    content: str | list[TextPart] | None = None  # None only for an assistant turn
    name: str | None = None


class ChatCompletionRequest(_Common):
    """POST /v1/chat/completions: messages rendered with the model's chat template."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    add_generation_prompt: bool | None = None
    logprobs: bool | None = None
    top_logprobs: TopN | None = None


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
