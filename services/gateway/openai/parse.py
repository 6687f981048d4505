"""Validation of /v1/completions and /v1/chat/completions bodies into ``GenerationRequest``s.

Every field's type and bounds are checked by the pydantic models (``models``); this module adds
what depends on the served model and the gateway's flags (the model name, the context length,
token ids inside the vocabulary, the number of stop strings and choices), tokenizes or renders
the chat template, and builds one ``GenerationRequest`` per choice.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from disagg.services.gateway.openai.errors import (
    context_length_exceeded,
    invalid_request,
    model_not_found,
)
from disagg.services.gateway.openai.fields import missing, unsupported, value_error
from disagg.services.gateway.openai.models import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    validate,
)
from disagg.services.gateway.openai.request import (
    COMPLETION_DEFAULT_MAX_TOKENS,
    GenerationRequest,
    Kind,
    ParseContext,
)
from disagg.services.gateway.openai.sampling import (
    chat_logprobs,
    processor_fields,
    sampling_fields,
    token_ids,
)
from disagg.services.gateway.openai.structured import checked, structured_of
from disagg.services.gateway.openai.tools import (
    template_tool_calls,
    template_tools,
    tool_plan,
)
from disagg.shared.protocol.sampling import SamplingParams
from disagg.shared.tokenizer import ChatTemplateError


@dataclass
class _Common:
    """Fields shared by both endpoints, validated."""

    model: str
    sampling: dict[str, Any]  # SamplingParams fields except max_tokens
    stop: list[str]
    stream: bool
    include_usage: bool
    continuous_usage: bool
    return_token_ids: bool
    prompt_logprobs: int | None
    n: int
    include_stop_str: bool
    skip_special_tokens: bool


def parse_completion(
    body: Any, ctx: ParseContext, *, request_id: str | None = None, created: int | None = None
) -> GenerationRequest:
    """Validate a /v1/completions body. Raises `APIError` (400, or 404 for the model)."""
    req = validate(CompletionRequest, body)
    common = _parse_common(req, ctx)
    common.sampling["logprobs"] = req.logprobs
    if req.echo and req.logprobs is not None:  # the echoed prompt's tokens get logprobs too
        common.sampling["prompt_logprobs"] = max(req.logprobs, common.prompt_logprobs or 0)
    choices = []
    for prompt_ids, prompt_text in _completion_prompts(req.prompt, ctx):
        max_tokens = _max_tokens(
            req.max_tokens, len(prompt_ids), ctx, "completion",
            default=COMPLETION_DEFAULT_MAX_TOKENS,
        )  # fmt: skip
        request = _request("completion", common, prompt_ids, max_tokens, request_id, created)
        request.echo_prompt_text = prompt_text if req.echo else None
        choices.append(request)
    return with_choices(choices, common.n, ctx)


def parse_chat(
    body: Any, ctx: ParseContext, *, request_id: str | None = None, created: int | None = None
) -> GenerationRequest:
    """Validate a /v1/chat/completions body and apply the chat template. Raises `APIError`."""
    req = validate(ChatCompletionRequest, body)
    common = _parse_common(req, ctx)
    # max_completion_tokens replaced max_tokens in OpenAI's API; it wins when both are given.
    requested = req.max_completion_tokens or req.max_tokens
    common.sampling["logprobs"] = chat_logprobs(req)
    plan, grammar = tool_plan(req, ctx.tool_parser)
    if grammar is not None:
        if common.sampling["structured"] is not None:
            message = f"tool_choice '{plan.mode}' writes the calls: give no other grammar."
            raise invalid_request(message, "tool_choice", "invalid_value")
        common.sampling["structured"] = checked("tools", grammar, ignore_eos=bool(req.ignore_eos))
    prompt_ids = render_messages(
        req.messages, ctx, req.add_generation_prompt is not False,
        tools=template_tools(req), kwargs=req.chat_template_kwargs,
    )  # fmt: skip
    max_tokens = _max_tokens(requested, len(prompt_ids), ctx, "chat")
    request = _request("chat", common, prompt_ids, max_tokens, request_id, created)
    request.tools = plan
    if plan is not None and plan.mode == "auto" and req.skip_special_tokens is None:
        request.skip_special_tokens = False  # a family may write its call tags as special tokens
    return with_choices([request], common.n, ctx)


def _parse_common(req: CompletionRequest | ChatCompletionRequest, ctx: ParseContext) -> _Common:
    model = check_model(req.model, ctx)
    n = req.n or 1
    if n > ctx.max_choices:
        raise value_error("n", f"at most {ctx.max_choices}", n)
    if req.best_of is not None and req.best_of != n:
        raise unsupported("best_of", "must equal n: every sequence generated is returned")
    stream, include_usage, continuous_usage = _stream(req)
    return _Common(
        model=model,
        sampling=sampling_fields(req, ctx)
        | processor_fields(req, ctx)
        | {"prompt_logprobs": req.prompt_logprobs, "structured": structured_of(req)},
        prompt_logprobs=req.prompt_logprobs,
        stop=_stop(req.stop, ctx),
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous_usage,
        return_token_ids=bool(req.return_token_ids),
        n=n,
        include_stop_str=bool(req.include_stop_str_in_output),
        skip_special_tokens=req.skip_special_tokens is not False,
    )


def check_model(value: str | None, ctx: ParseContext) -> str:
    """The served model a request names (the first one when it names none); 404 otherwise."""
    if value is None:  # vLLM serves its first model name when none is given
        return ctx.served_models[0]
    if value not in ctx.served_models:
        raise model_not_found(value)
    return value


def _stream(req: CompletionRequest | ChatCompletionRequest) -> tuple[bool, bool, bool]:
    """(stream, include_usage, continuous_usage_stats)."""
    if req.stream_options is None:
        return bool(req.stream), False, False
    if not req.stream:
        message = "The 'stream_options' parameter is only allowed when 'stream' is enabled."
        raise invalid_request(message, "stream_options", "invalid_value")
    options = req.stream_options
    return True, bool(options.include_usage), bool(options.continuous_usage_stats)


def _stop(value: str | list[str] | None, ctx: ParseContext) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if len(stops) > ctx.max_stop_strings:
        expected = f"at most {ctx.max_stop_strings} stop sequences"
        raise value_error("stop", expected, f"{len(stops)} sequences")
    for stop in stops:
        if not stop or len(stop) > ctx.max_stop_chars:
            expected = f"stop sequences of 1 to {ctx.max_stop_chars} characters"
            raise value_error("stop", expected, f"one of {len(stop)} characters")
    return list(dict.fromkeys(stops))


def _completion_prompts(value: str | list, ctx: ParseContext) -> list[tuple[list[int], str]]:
    """(prompt ids, prompt text) of each prompt: a string, token ids, or an array of either."""
    if isinstance(value, list) and value and not isinstance(value[0], int):  # several
        if len(value) > ctx.max_choices:
            expected = f"at most {ctx.max_choices} prompts"
            raise value_error("prompt", expected, f"{len(value)} prompts")
        return [_completion_prompt(v, ctx) for v in value]
    return [_completion_prompt(value, ctx)]


def _completion_prompt(value: str | list[int], ctx: ParseContext) -> tuple[list[int], str]:
    if isinstance(value, str):
        return _text_prompt(value, ctx), value
    if not value:
        raise invalid_request("The prompt must not be empty.", "prompt", "empty_prompt")
    ids = token_ids(value, "prompt", ctx)
    return ids, ctx.tokenizer.decode(ids)


def _text_prompt(text: str, ctx: ParseContext) -> list[int]:
    if len(text) > ctx.max_prompt_chars:
        expected = f"a prompt of at most {ctx.max_prompt_chars} characters"
        raise value_error("prompt", expected, f"{len(text)} characters")
    ids = ctx.tokenizer.encode(text, add_special_tokens=True) if text else []
    if not ids:
        raise invalid_request("The prompt must not be empty.", "prompt", "empty_prompt")
    return ids


def render_messages(
    messages: list[ChatMessage],
    ctx: ParseContext,
    add_generation_prompt: bool,
    *,
    tools: list[dict[str, Any]] | None = None,
    kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """Validated chat messages (and tools, and the template's own ``kwargs``) through the chat
    template, as token ids."""
    taken = sorted(set(kwargs or {}) & RESERVED_TEMPLATE_VARS)
    if taken:
        message = f"'chat_template_kwargs' may not set {', '.join(taken)}."
        raise invalid_request(message, "chat_template_kwargs", "invalid_value")
    try:
        text = ctx.tokenizer.apply_chat_template(
            _messages(messages, ctx), add_generation_prompt=add_generation_prompt,
            tools=tools, **(kwargs or {}),
        )  # fmt: skip
    except ChatTemplateError as err:
        raise invalid_request(str(err), "messages", "chat_template_error") from None
    # The template already holds the special tokens (BOS, role markers), as in vLLM.
    return ctx.tokenizer.encode(text, add_special_tokens=False)


RESERVED_TEMPLATE_VARS = {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token",
                          "raise_exception"}  # fmt: skip


def _messages(messages: list[ChatMessage], ctx: ParseContext) -> list[dict[str, Any]]:
    out = []
    for i, message in enumerate(messages):
        content = message.content
        if content is None and message.role != "assistant":  # an assistant turn may have none
            raise missing(f"messages[{i}].content")
        if isinstance(content, list):  # vLLM's "string" content format: parts joined by newlines
            content = "\n".join(part.text for part in content)
        entry: dict[str, Any] = {"role": message.role, "content": content or ""}
        if message.name is not None:
            entry["name"] = message.name
        if message.tool_calls:
            if message.role != "assistant":
                raise invalid_request("Only an assistant message has 'tool_calls'.",
                                      f"messages[{i}].tool_calls", "invalid_value")  # fmt: skip
            entry["tool_calls"] = template_tool_calls(message.tool_calls)
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        out.append(entry)
    chars = sum(len(m["content"]) for m in out)
    if chars > ctx.max_prompt_chars:
        expected = f"messages of at most {ctx.max_prompt_chars} characters in all"
        raise value_error("messages", expected, f"{chars} characters")
    return out


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
    if common.sampling["min_tokens"] > max_tokens:
        raise value_error(
            "min_tokens", f"at most max_tokens ({max_tokens})", common.sampling["min_tokens"]
        )
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
        continuous_usage=common.continuous_usage,
        prompt_logprobs=common.prompt_logprobs,
        include_stop_str=common.include_stop_str,
        skip_special_tokens=common.skip_special_tokens,
        return_token_ids=common.return_token_ids,
        created=int(time.time()) if created is None else created,
    )


def with_choices(prompts: list[GenerationRequest], n: int, ctx: ParseContext) -> GenerationRequest:
    """One request whose ``choices`` are every prompt x ``n`` sequences, indexed in OpenAI's
    order (prompt-major). Each sequence draws from a seed of its own (a seeded request's
    sequence 0 keeps the seed itself), so n seeded samples differ and repeat."""
    if len(prompts) * n > ctx.max_choices:
        expected = f"at most {ctx.max_choices} choices (prompts x n)"
        raise value_error("n", expected, f"{len(prompts) * n} choices")
    head = prompts[0]
    if len(prompts) == 1 and n == 1:
        return head
    choices = []
    for i, req in enumerate(prompts):
        for j in range(n):
            index = i * n + j
            params = req.params.replace(seed=sequence_seed(req.params.seed, j))
            choices.append(replace(req, request_id=f"{head.request_id}-{index}", index=index,
                                   params=params, response_id=head.request_id))  # fmt: skip
    return replace(head, choices=choices)


def sequence_seed(seed: int | None, sequence: int) -> int | None:
    """Sequence j's seed: the request's for j = 0, else a 63-bit mix of (seed, j)."""
    if seed is None or sequence == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}/{sequence}".encode(), digest_size=8).digest()
    return int.from_bytes(digest) >> 1
