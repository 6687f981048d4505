"""The request bodies as pydantic models: the one validator of every field's type and bounds.

Strict (no "5" for 5, no 1 for true, no 5.0 for an integer; an integer is a number) and finite
(no NaN or infinity). Unknown fields are kept and ignored, as vLLM does. A parameter that
would change the output and is not implemented is accepted only at its neutral value
(``fields.NEUTRAL``); anything else is refused, never ignored. ``validate`` turns the first
pydantic error into OpenAI's 400 body, ``param`` being the offending value's path
(``messages[0].content``, ``logit_bias.17``). What depends on the served model or the gateway's
flags (the context length, token ids inside the vocabulary, how many stop strings, ``n`` x
prompts) is checked after, in ``parse``; these models are also the OpenAPI description.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from disagg.services.gateway.openai.errors import APIError, invalid_request
from disagg.services.gateway.openai.fields import (
    CHAT_NEUTRAL,
    COMPLETION_NEUTRAL,
    NEUTRAL,
    from_validation_error,
)
from disagg.services.gateway.openai.request import ROLES, SEED_MAX, SEED_MIN
from disagg.services.gateway.openai.structured import (
    Choices,
    ResponseFormat,
    Schema,
    StructuredOutputs,
)
from disagg.services.gateway.openai.tools import Tool, ToolCallIn, ToolChoice
from disagg.shared.protocol.sampling import MAX_LOGPROBS

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TokenId = Annotated[int, Field(ge=0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
TopN = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]
AtLeastOne = Annotated[int, Field(ge=1)]
M = TypeVar("M", bound=BaseModel)


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


def _neutral(table: dict):
    """A validator refusing, with an "unsupported" error, any value but the neutral one."""

    def check(cls, value: Any, info: ValidationInfo) -> Any:
        if not table[info.field_name](value):
            raise PydanticCustomError("unsupported", "is not supported by this server")
        return value

    return field_validator(*table, mode="before")(classmethod(check))


def _own(table: dict) -> dict:
    """An endpoint's neutral-value entries beyond the shared ones."""
    return {name: check for name, check in table.items() if name not in NEUTRAL}


Neutral = Annotated[Any, Field(description="accepted only at its neutral value")]


class _Common(_Body):
    model: str | None = Field(None, description="a served model (GET /v1/models)")
    temperature: Temperature | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    n: AtLeastOne | None = None  # at most --max-choices (with the prompts): checked in parse
    best_of: AtLeastOne | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=1e6)] | None = None
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
    max_tokens: AtLeastOne | None = None
    use_beam_search: Neutral = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: Schema | str | None = None
    guided_regex: str | None = None
    guided_choice: Choices | None = None
    guided_grammar: str | None = None
    functions: Neutral = None
    function_call: Neutral = None
    truncate_prompt_tokens: Neutral = None

    _common_neutral = _neutral(NEUTRAL)


class CompletionRequest(_Common):
    """POST /v1/completions: a prompt (text or token ids), or a list of them (one choice each)."""

    prompt: str | list[int] | list[str | list[int]]
    echo: bool | None = None
    logprobs: TopN | None = None
    suffix: Neutral = None
    add_special_tokens: Neutral = None
    tools: Neutral = None
    tool_choice: Neutral = None

    _completion_neutral = _neutral(_own(COMPLETION_NEUTRAL))


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal[ROLES]
    content: str | list[TextPart] | None = None  # None only for an assistant turn
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn: the call it answers


class ChatCompletionRequest(_Common):
    """POST /v1/chat/completions: messages rendered with the model's chat template."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: AtLeastOne | None = None
    add_generation_prompt: bool | None = None
    logprobs: bool | None = None
    top_logprobs: TopN | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    echo: Neutral = None
    continue_final_message: Neutral = None
    chat_template: Neutral = None
    add_special_tokens: Neutral = None

    _chat_neutral = _neutral(_own(CHAT_NEUTRAL))


class TokenizeRequest(_Body):
    """POST /tokenize (vLLM): a prompt, or chat messages through the template."""

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_generation_prompt: bool | None = None
    add_special_tokens: bool | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(_Body):
    """POST /detokenize (vLLM): token ids back to text."""

    model: str | None = None
    tokens: list[int]


def validate(model: type[M], body: Any) -> M:
    """``body`` as ``model``; APIError (400, OpenAI's body) for the first thing wrong."""
    if not isinstance(body, dict):
        raise invalid_request("The request body must be a JSON object.", None)
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise from_validation_error(err, body) from None


__all__ = ["APIError", "ChatCompletionRequest", "CompletionRequest", "validate"]
