"""The OpenAI protocol of /v1/completions and /v1/chat/completions, with no I/O.

Request bodies (already JSON-decoded) are validated strictly and turned into a
`GenerationRequest`; builders produce the response, stream-chunk, usage and error bodies in the
exact shapes of the OpenAI API, with vLLM's extensions where it defines them
(`return_token_ids`, `top_k`, `stop_token_ids`, `ignore_eos`, `add_generation_prompt`).

What is served: one prompt, one choice (n=1) per request. Sampling is temperature / top-p /
top-k / seed only: parameters that would change the output and are not implemented (logprobs,
penalties, logit_bias, tools, response_format, ...) are refused with a 400 unless they hold
their neutral value, rather than silently ignored. Unknown fields are ignored, as vLLM does.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from disagg.shared.sampling import SamplingParams
from disagg.shared.tokenizer import ChatTemplateError, Tokenizer

Kind = Literal["completion", "chat"]
ROLES = ("system", "developer", "user", "assistant", "tool")
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a C long, as vLLM accepts
SSE_DONE = b"data: [DONE]\n\n"
# OpenAI's (and vLLM's) max_tokens when a /v1/completions body has none; chat fills the context.
COMPLETION_DEFAULT_MAX_TOKENS = 16

# ---------------------------------------------------------------------------------------------
# Errors


class APIError(Exception):
    """An error the client is told about: HTTP status plus the OpenAI error body.

    `retry_after_s` (429, 503) becomes a Retry-After header; see `headers`.
    """

    def __init__(
        self,
        status: int,
        message: str,
        type: str,
        param: str | None = None,
        code: str | None = None,
        *,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.retry_after_s = param, code, retry_after_s

    def body(self) -> dict[str, Any]:
        """`{"error": {"message", "type", "param", "code"}}`."""
        error = {"message": self.message, "type": self.type, "param": self.param}
        return {"error": error | {"code": self.code}}

    @property
    def headers(self) -> dict[str, str]:
        """Extra HTTP headers of the reply."""
        return {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """400: a field is missing, of the wrong type, out of range or unsupported."""
    return APIError(400, message, "invalid_request_error", param, code)


def model_not_found(model: str) -> APIError:
    """404 for a model name this gateway does not serve (vLLM's wording)."""
    return APIError(
        404, f"The model `{model}` does not exist.", "not_found_error", "model", "model_not_found"
    )


def authentication_failed() -> APIError:
    """401: missing or wrong API key (the key itself is never echoed back)."""
    message = "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'."
    return APIError(401, message, "authentication_error", None, "invalid_api_key")


def payload_too_large(limit_bytes: int) -> APIError:
    """413: the request body exceeds the gateway's limit."""
    message = f"The request body is larger than this server's limit of {limit_bytes} bytes."
    return APIError(413, message, "invalid_request_error", None, "request_too_large")


def queue_full(retry_after_s: int = 1) -> APIError:
    """429: too many requests in flight; retry after `retry_after_s` seconds."""
    message = "The server is at capacity. Please retry your request later."
    return APIError(
        429, message, "rate_limit_error", None, "queue_full", retry_after_s=retry_after_s
    )


def service_unavailable(message: str, retry_after_s: int | None = None) -> APIError:
    """503: no worker can take the request now (e.g. no decode worker alive)."""
    code, type_ = "service_unavailable", "service_unavailable_error"
    return APIError(503, message, type_, None, code, retry_after_s=retry_after_s)


def gateway_timeout(message: str) -> APIError:
    """504: a bounded wait (placement, admit, first token, token gap) ran out."""
    return APIError(504, message, "timeout_error", None, "timeout")


def internal_error(message: str = "The server had an error processing your request.") -> APIError:
    """500: a bug or an unexpected worker failure."""
    return APIError(500, message, "server_error", None, "internal_error")


def context_length_exceeded(
    max_model_len: int, prompt_tokens: int, max_tokens: int | None, kind: Kind
) -> APIError:
    """400 with OpenAI's "maximum context length" message; `max_tokens` None means the prompt
    alone leaves no room for one generated token."""
    if kind == "chat":
        message = _chat_context_message(max_model_len, prompt_tokens, max_tokens)
        return invalid_request(message, "messages", "context_length_exceeded")
    completion = 0 if max_tokens is None else max_tokens
    message = (
        f"This model's maximum context length is {max_model_len} tokens, however you requested "
        f"{prompt_tokens + completion} tokens ({prompt_tokens} in your prompt; {completion} for "
        "the completion). Please reduce your prompt; or completion length."
    )
    return invalid_request(message, "prompt", "context_length_exceeded")


def _chat_context_message(max_model_len: int, prompt_tokens: int, max_tokens: int | None) -> str:
    head = f"This model's maximum context length is {max_model_len} tokens. However, "
    if max_tokens is None:
        return head + (
            f"your messages resulted in {prompt_tokens} tokens. "
            "Please reduce the length of the messages."
        )
    return head + (
        f"you requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, "
        f"{max_tokens} in the completion). Please reduce the length of the messages or completion."
    )


# ---------------------------------------------------------------------------------------------
# Parsed request


@dataclass(frozen=True)
class ParseContext:
    """What validation needs to know about the served model, and the gateway's limits.

    `vocab_size` bounds prompt and stop token ids (default: the tokenizer's, which excludes a
    padded embedding's extra rows). `default_max_tokens` None fills the context window when a
    chat request gives no max_tokens (vLLM's policy); an int caps that. A completion request
    without max_tokens gets OpenAI's 16. `default_temperature` is
    OpenAI's 1.0 unless the model's generation_config says otherwise. `max_stop_strings` is
    OpenAI's limit of 4.
    """

    served_models: tuple[str, ...]
    tokenizer: Tokenizer
    max_model_len: int
    vocab_size: int | None = None
    default_max_tokens: int | None = None
    default_temperature: float = 1.0
    max_prompt_chars: int = 1_000_000
    max_stop_strings: int = 4
    max_stop_chars: int = 200
    max_stop_token_ids: int = 64

    def __post_init__(self) -> None:
        if not self.served_models or not all(isinstance(m, str) for m in self.served_models):
            raise ValueError(f"served_models must name at least one model: {self.served_models}")
        object.__setattr__(self, "served_models", tuple(self.served_models))
        limits = ("max_model_len", "max_prompt_chars", "max_stop_chars")
        limits += ("max_stop_strings", "max_stop_token_ids")
        for name in limits:
            if not getattr(self, name) >= 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")
        if not 0.0 <= self.default_temperature <= 2.0:
            raise ValueError(f"default_temperature must be in [0, 2]: {self.default_temperature}")

    @property
    def token_limit(self) -> int:
        """Token ids must be below this."""
        return self.vocab_size if self.vocab_size is not None else self.tokenizer.vocab_size


@dataclass
class GenerationRequest:
    """One validated request, ready to be placed on workers.

    `stop` strings are applied by the gateway (see `StreamDetokenizer`); `params` carries
    everything the workers need. `echo_prompt_text` is set when a completion asked for echo:
    responses then start with it.
    """

    request_id: str
    kind: Kind
    model: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False
    created: int = 0
    echo_prompt_text: str | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


# ---------------------------------------------------------------------------------------------
# Field checks


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    names = {int: "an integer", float: "a decimal", str: "a string", list: "an array"}
    return names.get(type(value), "an object" if isinstance(value, dict) else "a value")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return _is_int(value)


def _type_error(param: str, expected: str, value: Any) -> APIError:
    message = f"Invalid type for '{param}': expected {expected}, but got {_json_type(value)}"
    return invalid_request(message + " instead.", param, "invalid_type")


def _value_error(param: str, expected: str, value: Any) -> APIError:
    shown = json.dumps(value) if _is_number(value) else str(value)[:100]
    message = f"Invalid '{param}': expected {expected}, but got {shown} instead."
    return invalid_request(message, param, "invalid_value")


def _missing(param: str) -> APIError:
    return invalid_request(f"Missing required parameter: '{param}'.", param, "missing_required")


def _unsupported(param: str, why: str = "is not supported by this server") -> APIError:
    return invalid_request(f"Unsupported parameter: '{param}' {why}.", param, "unsupported")


class _Fields:
    """Typed, range-checked reads of one JSON object; null counts as absent."""

    def __init__(self, body: Any, prefix: str = "", name: str = "body") -> None:
        if not isinstance(body, dict):
            if not prefix:
                raise invalid_request("The request body must be a JSON object.", None)
            raise _type_error(name, "an object", body)
        self.body, self.prefix = body, prefix

    def get(self, name: str) -> Any:
        return self.body.get(name)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.body.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise _type_error(self.prefix + name, "a boolean", value)
        return value

    def integer(self, name: str, lo: int, hi: int | None = None) -> int | None:
        value = self.body.get(name)
        if value is None:
            return None
        if not _is_int(value):
            raise _type_error(self.prefix + name, "an integer", value)
        if value < lo or (hi is not None and value > hi):
            bounds = f"an integer >= {lo}" + ("" if hi is None else f" and <= {hi}")
            raise _value_error(self.prefix + name, bounds, value)
        return value

    def number(self, name: str, lo: float, hi: float, *, open_lo: bool = False) -> float | None:
        value = self.body.get(name)
        if value is None:
            return None
        if not _is_number(value):
            raise _type_error(self.prefix + name, "a decimal", value)
        if value > hi or value < lo or (open_lo and value == lo):
            bounds = f"a value {'>' if open_lo else '>='} {lo} and <= {hi}"
            raise _value_error(self.prefix + name, bounds, value)
        return float(value)


def _is_zero(value: Any) -> bool:
    return _is_number(value) and value == 0


def _is_off(value: Any) -> bool:
    return value is None or value is False


# Parameters that are accepted only at their neutral value (which is also their default).
_NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "best_of": lambda v: v is None or (_is_int(v) and v == 1),
    "logit_bias": lambda v: v is None or v == {},
    "presence_penalty": lambda v: v is None or _is_zero(v),
    "frequency_penalty": lambda v: v is None or _is_zero(v),
    "repetition_penalty": lambda v: v is None or (_is_number(v) and v == 1),
    "min_p": lambda v: v is None or _is_zero(v),
    "min_tokens": lambda v: v is None or _is_zero(v),
    "use_beam_search": _is_off,
    "include_stop_str_in_output": _is_off,
    "skip_special_tokens": lambda v: v is None or v is True,
    "prompt_logprobs": lambda v: v is None,
    "response_format": lambda v: v is None or v == {"type": "text"},
    "tools": lambda v: v is None or v == [],
    "functions": lambda v: v is None or v == [],
    "tool_choice": lambda v: v in (None, "none", "auto"),
    "function_call": lambda v: v in (None, "none", "auto"),
    "guided_json": lambda v: v is None,
    "guided_regex": lambda v: v is None,
    "guided_choice": lambda v: v is None,
    "structured_outputs": lambda v: v is None,
}
_COMPLETION_NEUTRAL = _NEUTRAL | {
    "logprobs": lambda v: v is None,
    "suffix": lambda v: v is None or v == "",
}
_CHAT_NEUTRAL = _NEUTRAL | {
    "logprobs": _is_off,
    "top_logprobs": lambda v: v is None or _is_zero(v),
    "echo": _is_off,
    "continue_final_message": _is_off,
    "chat_template": lambda v: v is None,
    "chat_template_kwargs": lambda v: v is None or v == {},
}


def _check_unsupported(fields: _Fields, neutral: dict[str, Callable[[Any], bool]]) -> None:
    for name, is_neutral in neutral.items():
        if name in fields.body and not is_neutral(fields.body[name]):
            raise _unsupported(name)


# ---------------------------------------------------------------------------------------------
# Parsing


@dataclass
class _Common:
    """Fields shared by both endpoints, validated."""

    model: str
    sampling: dict[str, Any]  # SamplingParams fields except max_tokens
    stop: list[str]
    stream: bool
    include_usage: bool
    return_token_ids: bool


def parse_completion(
    body: Any, ctx: ParseContext, *, request_id: str | None = None, created: int | None = None
) -> GenerationRequest:
    """Validate a /v1/completions body. Raises `APIError` (400, or 404 for the model)."""
    fields = _Fields(body)
    common = _parse_common(fields, ctx, _COMPLETION_NEUTRAL)
    echo = fields.boolean("echo", False)
    requested = fields.integer("max_tokens", 1)
    prompt_ids, prompt_text = _completion_prompt(fields.get("prompt"), ctx)
    max_tokens = _max_tokens(
        requested, len(prompt_ids), ctx, "completion", default=COMPLETION_DEFAULT_MAX_TOKENS
    )
    request = _request("completion", common, prompt_ids, max_tokens, request_id, created)
    request.echo_prompt_text = prompt_text if echo else None
    return request


def parse_chat(
    body: Any, ctx: ParseContext, *, request_id: str | None = None, created: int | None = None
) -> GenerationRequest:
    """Validate a /v1/chat/completions body and apply the chat template. Raises `APIError`."""
    fields = _Fields(body)
    common = _parse_common(fields, ctx, _CHAT_NEUTRAL)
    # max_completion_tokens replaced max_tokens in OpenAI's API; it wins when both are given.
    legacy = fields.integer("max_tokens", 1)
    requested = fields.integer("max_completion_tokens", 1) or legacy
    add_generation_prompt = fields.boolean("add_generation_prompt", True)
    messages = _messages(fields.get("messages"), ctx)
    prompt_ids = _render_chat(messages, ctx, add_generation_prompt)
    max_tokens = _max_tokens(requested, len(prompt_ids), ctx, "chat")
    return _request("chat", common, prompt_ids, max_tokens, request_id, created)


def _parse_common(
    fields: _Fields, ctx: ParseContext, neutral: dict[str, Callable[[Any], bool]]
) -> _Common:
    model = _model(fields.get("model"), ctx)
    _check_unsupported(fields, neutral)
    if fields.integer("n", 1) not in (None, 1):
        raise _unsupported("n", "must be 1: this server returns one choice per request")
    stream, include_usage = _stream(fields)
    return _Common(
        model=model,
        sampling=_sampling(fields, ctx),
        stop=_stop(fields.get("stop"), ctx),
        stream=stream,
        include_usage=include_usage,
        return_token_ids=fields.boolean("return_token_ids", False),
    )


def _model(value: Any, ctx: ParseContext) -> str:
    if value is None:  # vLLM serves its first model name when none is given
        return ctx.served_models[0]
    if not isinstance(value, str):
        raise _type_error("model", "a string", value)
    if value not in ctx.served_models:
        raise model_not_found(value)
    return value


def _stream(fields: _Fields) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = fields.boolean("stream", False)
    if fields.get("stream_options") is None:
        return stream, False
    if not stream:
        message = "The 'stream_options' parameter is only allowed when 'stream' is enabled."
        raise invalid_request(message, "stream_options", "invalid_value")
    options = _Fields(fields.get("stream_options"), "stream_options.", "stream_options")
    if options.boolean("continuous_usage_stats", False):
        raise _unsupported("stream_options.continuous_usage_stats")
    return True, options.boolean("include_usage", False)


def _sampling(fields: _Fields, ctx: ParseContext) -> dict[str, Any]:
    temperature = fields.number("temperature", 0.0, 2.0)
    top_p = fields.number("top_p", 0.0, 1.0, open_lo=True)
    top_k = fields.integer("top_k", -1)
    return {
        "temperature": ctx.default_temperature if temperature is None else temperature,
        "top_p": 1.0 if top_p is None else top_p,
        "top_k": 0 if top_k in (None, -1) else top_k,  # -1 and 0 both mean off
        "seed": fields.integer("seed", SEED_MIN, SEED_MAX),
        "stop_token_ids": _stop_token_ids(fields.get("stop_token_ids"), ctx),
        "ignore_eos": fields.boolean("ignore_eos", False),
    }


def _stop(value: Any, ctx: ParseContext) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _type_error("stop", "a string or an array of strings", value)
    if len(stops) > ctx.max_stop_strings:
        expected = f"at most {ctx.max_stop_strings} stop sequences"
        raise _value_error("stop", expected, f"{len(stops)} sequences")
    for stop in stops:
        if not stop or len(stop) > ctx.max_stop_chars:
            expected = f"stop sequences of 1 to {ctx.max_stop_chars} characters"
            raise _value_error("stop", expected, f"one of {len(stop)} characters")
    return list(dict.fromkeys(stops))


def _stop_token_ids(value: Any, ctx: ParseContext) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _type_error("stop_token_ids", "an array of integers", value)
    if len(value) > ctx.max_stop_token_ids:
        expected = f"at most {ctx.max_stop_token_ids} token ids"
        raise _value_error("stop_token_ids", expected, f"{len(value)} ids")
    return tuple(_token_ids(value, "stop_token_ids", ctx))


def _token_ids(values: list[Any], param: str, ctx: ParseContext) -> list[int]:
    limit = ctx.token_limit
    for value in values:
        if not _is_int(value):
            raise _type_error(param, "an array of integers", value)
        if not 0 <= value < limit:
            raise invalid_request(
                f"Token id {value} is out of vocabulary (ids are 0 to {limit - 1}).",
                param,
                "invalid_value",
            )
    return list(values)


def _completion_prompt(value: Any, ctx: ParseContext) -> tuple[list[int], str]:
    """(prompt ids, prompt text) of a string, [string], token ids or [token ids] prompt."""
    if value is None:
        raise _missing("prompt")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one is one prompt
    if isinstance(value, str):
        return _text_prompt(value, ctx), value
    expected = "a string, an array of strings or an array of token ids"
    if not isinstance(value, list):
        raise _type_error("prompt", expected, value)
    if len(value) > 1 and all(isinstance(v, (str, list)) for v in value):
        message = (
            "Batched prompts are not supported: this server takes one prompt per request "
            "(n=1, batch=1). Send one request per prompt."
        )
        raise invalid_request(message, "prompt", "unsupported")
    if not value:
        raise invalid_request("The prompt must not be empty.", "prompt", "empty_prompt")
    ids = _token_ids(value, "prompt", ctx)
    return ids, ctx.tokenizer.decode(ids)


def _text_prompt(text: str, ctx: ParseContext) -> list[int]:
    if len(text) > ctx.max_prompt_chars:
        expected = f"a prompt of at most {ctx.max_prompt_chars} characters"
        raise _value_error("prompt", expected, f"{len(text)} characters")
    ids = ctx.tokenizer.encode(text, add_special_tokens=True) if text else []
    if not ids:
        raise invalid_request("The prompt must not be empty.", "prompt", "empty_prompt")
    return ids


def _messages(value: Any, ctx: ParseContext) -> list[dict[str, str]]:
    if value is None:
        raise _missing("messages")
    if not isinstance(value, list):
        raise _type_error("messages", "an array", value)
    if not value:
        raise invalid_request("'messages' must contain at least one message.", "messages")
    messages = [_message(m, f"messages[{i}]") for i, m in enumerate(value)]
    chars = sum(len(m["content"]) for m in messages)
    if chars > ctx.max_prompt_chars:
        expected = f"messages of at most {ctx.max_prompt_chars} characters in all"
        raise _value_error("messages", expected, f"{chars} characters")
    return messages


def _message(value: Any, where: str) -> dict[str, str]:
    fields = _Fields(value, where + ".", where)
    role = fields.get("role")
    if role is None:
        raise _missing(where + ".role")
    if not isinstance(role, str):
        raise _type_error(where + ".role", "a string", role)
    if role not in ROLES:
        raise _value_error(where + ".role", f"one of {', '.join(ROLES)}", repr(role))
    message = {"role": role, "content": _content(fields.get("content"), role, where + ".content")}
    name = fields.get("name")
    if name is not None and not isinstance(name, str):
        raise _type_error(where + ".name", "a string", name)
    return message if name is None else message | {"name": name}


def _content(value: Any, role: str, where: str) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        if role == "assistant":  # an assistant turn may have no content
            return ""
        raise _missing(where)
    if not isinstance(value, list):
        raise _type_error(where, "a string or an array of content parts", value)
    # vLLM's "string" content format: text parts joined by newlines.
    return "\n".join(_text_part(part, f"{where}[{i}]") for i, part in enumerate(value))


def _text_part(value: Any, where: str) -> str:
    fields = _Fields(value, where + ".", where)
    if fields.get("type") != "text":
        message = f"Unsupported content part type {fields.get('type')!r} in '{where}': "
        raise invalid_request(message + "only 'text' parts are supported.", where + ".type")
    text = fields.get("text")
    if not isinstance(text, str):
        raise _type_error(where + ".text", "a string", text)
    return text


def _render_chat(
    messages: list[dict[str, str]], ctx: ParseContext, add_generation_prompt: bool
) -> list[int]:
    try:
        text = ctx.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt
        )
    except ChatTemplateError as err:
        raise invalid_request(str(err), "messages", "chat_template_error") from None
    # The template already holds the special tokens (BOS, role markers), as in vLLM.
    return ctx.tokenizer.encode(text, add_special_tokens=False)


def _max_tokens(
    requested: int | None,
    prompt_len: int,
    ctx: ParseContext,
    kind: Kind,
    default: int | None = None,
) -> int:
    """The request's max_tokens, or the default: `default`, else `ctx.default_max_tokens`, else
    all the room left in the context; a default never exceeds the room."""
    room = ctx.max_model_len - prompt_len
    if requested is None:
        if room < 1:
            raise context_length_exceeded(ctx.max_model_len, prompt_len, None, kind)
        cap = default if default is not None else ctx.default_max_tokens
        return room if cap is None else min(room, cap)
    if requested > room:
        raise context_length_exceeded(ctx.max_model_len, prompt_len, requested, kind)
    return requested


def _request(
    kind: Kind,
    common: _Common,
    prompt_ids: list[int],
    max_tokens: int,
    request_id: str | None,
    created: int | None,
) -> GenerationRequest:
    try:
        params = SamplingParams(max_tokens=max_tokens, **common.sampling)
    except ValueError as err:  # unreachable after the checks above; kept as a 400, not a 500
        raise invalid_request(str(err)) from None
    prefix = "cmpl" if kind == "completion" else "chatcmpl"
    return GenerationRequest(
        request_id=request_id or f"{prefix}-{uuid.uuid4().hex}",
        kind=kind,
        model=common.model,
        prompt_token_ids=prompt_ids,
        params=params,
        stop=common.stop,
        stream=common.stream,
        include_usage=common.include_usage,
        return_token_ids=common.return_token_ids,
        created=int(time.time()) if created is None else created,
    )


# ---------------------------------------------------------------------------------------------
# Responses


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; `cached_tokens` are prompt tokens served from a prefix cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _head(req: GenerationRequest, object_name: str) -> dict[str, Any]:
    return {"id": req.request_id, "object": object_name, "created": req.created, "model": req.model}


def _chunk_object(req: GenerationRequest) -> str:
    return "text_completion" if req.kind == "completion" else "chat.completion.chunk"


def completion_response(
    req: GenerationRequest,
    text: str,
    finish_reason: str,
    usage: dict[str, Any],
    token_ids: Sequence[int] = (),
) -> dict[str, Any]:
    """The non-streamed /v1/completions body (echoed prompt first when asked)."""
    choice = {
        "index": 0,
        "text": (req.echo_prompt_text or "") + text,
        "logprobs": None,
        "finish_reason": finish_reason,
    }
    if req.return_token_ids:  # vLLM puts both lists on the choice for completions
        choice |= {"prompt_token_ids": list(req.prompt_token_ids), "token_ids": list(token_ids)}
    return _head(req, "text_completion") | {"choices": [choice], "usage": usage}


def chat_response(
    req: GenerationRequest,
    text: str,
    finish_reason: str,
    usage: dict[str, Any],
    token_ids: Sequence[int] = (),
) -> dict[str, Any]:
    """The non-streamed /v1/chat/completions body."""
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "logprobs": None,
        "finish_reason": finish_reason,
    }
    body = _head(req, "chat.completion") | {"choices": [choice], "usage": usage}
    if req.return_token_ids:  # vLLM: prompt ids at the top, generated ids on the choice
        choice["token_ids"] = list(token_ids)
        body["prompt_token_ids"] = list(req.prompt_token_ids)
    return body


def completion_chunk(
    req: GenerationRequest,
    text: str,
    finish_reason: str | None = None,
    token_ids: Sequence[int] = (),
    *,
    first: bool = False,
) -> dict[str, Any]:
    """One streamed /v1/completions chunk; the `first` one carries the echoed prompt and, with
    return_token_ids, the prompt ids."""
    echo = (req.echo_prompt_text or "") if first else ""
    choice = {"index": 0, "text": echo + text, "logprobs": None, "finish_reason": finish_reason}
    if req.return_token_ids:
        if first:
            choice["prompt_token_ids"] = list(req.prompt_token_ids)
        choice["token_ids"] = list(token_ids)
    return _chunk(req, choice)


def chat_chunk(
    req: GenerationRequest,
    delta: str,
    finish_reason: str | None = None,
    token_ids: Sequence[int] = (),
    *,
    first: bool = False,
) -> dict[str, Any]:
    """One streamed chat chunk. The `first` one carries the role with the first content (and,
    with return_token_ids, the prompt ids); a closing chunk with no text has an empty delta."""
    message: dict[str, Any] = {"role": "assistant", "content": delta} if first else {}
    if delta and not first:
        message["content"] = delta
    choice = {"index": 0, "delta": message, "logprobs": None, "finish_reason": finish_reason}
    if req.return_token_ids:
        choice["token_ids"] = list(token_ids)
    chunk = _chunk(req, choice)
    if req.return_token_ids and first:
        chunk["prompt_token_ids"] = list(req.prompt_token_ids)
    return chunk


def _chunk(req: GenerationRequest, choice: dict[str, Any]) -> dict[str, Any]:
    chunk = _head(req, _chunk_object(req)) | {"choices": [choice]}
    if req.include_usage:  # OpenAI: every chunk has "usage": null except the last one
        chunk["usage"] = None
    return chunk


def usage_chunk(req: GenerationRequest, usage: dict[str, Any]) -> dict[str, Any]:
    """The last chunk of a stream with include_usage: no choices, the usage."""
    return _head(req, _chunk_object(req)) | {"choices": [], "usage": usage}


def models_response(
    names: Iterable[str], created: int, owned_by: str = "disagg", max_model_len: int | None = None
) -> dict[str, Any]:
    """The /v1/models body (vLLM adds `max_model_len` to each model)."""
    extra = {} if max_model_len is None else {"max_model_len": max_model_len}
    data = [
        {"id": name, "object": "model", "created": created, "owned_by": owned_by} | extra
        for name in names
    ]
    return {"object": "list", "data": data}


def sse(obj: Any) -> bytes:
    """One server-sent event: `data: <json>` and a blank line (JSON never holds a raw newline)."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return b"data: " + text.encode() + b"\n\n"


class StreamAssembler:
    """Turns one request's text deltas into its stream chunks, in order.

    It holds back content-less chunks (a delta whose text the detokenizer held back) and carries
    their token ids into the next chunk, puts the role / prompt ids / echo on the first chunk
    that goes out, and ends with the finish chunk and (include_usage) the usage chunk. The
    caller frames each dict (`sse`, or JSON on NATS) and, over HTTP, sends `SSE_DONE` last.
    """

    def __init__(self, req: GenerationRequest) -> None:
        self.req = req
        self._first = True
        self._pending_ids: list[int] = []
        self._build = completion_chunk if req.kind == "completion" else chat_chunk

    def delta(self, text: str, token_ids: Sequence[int] = ()) -> list[dict[str, Any]]:
        """Chunks for newly generated text (none when `text` is empty)."""
        self._pending_ids.extend(token_ids)
        if not text:
            return []
        return [self._emit(text, None)]

    def finish(
        self,
        finish_reason: str,
        usage: dict[str, Any],
        text: str = "",
        token_ids: Sequence[int] = (),
    ) -> list[dict[str, Any]]:
        """The closing chunk (last text, if any, with the finish reason), then usage."""
        self._pending_ids.extend(token_ids)
        chunks = [self._emit(text, finish_reason)]
        if self.req.include_usage:
            chunks.append(usage_chunk(self.req, usage))
        return chunks

    def _emit(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        chunk = self._build(self.req, text, finish_reason, self._pending_ids, first=self._first)
        self._first, self._pending_ids = False, []
        return chunk
