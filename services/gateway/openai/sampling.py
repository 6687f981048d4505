"""The sampling fields of a validated request body as ``SamplingParams`` keyword arguments:
vLLM's defaults; token-valued fields (logit_bias, allowed_token_ids, bad_words) as the token ids
the workers take, checked against the vocabulary."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from disagg.services.gateway.openai.errors import invalid_request
from disagg.services.gateway.openai.fields import value_error
from disagg.services.gateway.openai.request import ParseContext

if TYPE_CHECKING:
    from disagg.services.gateway.openai.models import ChatCompletionRequest, CompletionRequest

    Body = CompletionRequest | ChatCompletionRequest


def chat_logprobs(req: ChatCompletionRequest) -> int | None:
    """Chat's `logprobs: true` with `top_logprobs: 0..20` as the workers' top-n count."""
    top = req.top_logprobs
    if not req.logprobs:
        if top:
            message = "'top_logprobs' needs 'logprobs' set to true."
            raise invalid_request(message, "top_logprobs", "invalid_value")
        return None
    return top or 0


def sampling_fields(req: Body, ctx: ParseContext) -> dict[str, Any]:
    return {
        "temperature": ctx.default_temperature if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "top_k": 0 if req.top_k in (None, -1) else req.top_k,  # -1 and 0 both mean off
        "seed": req.seed,
        "stop_token_ids": _stop_token_ids(req.stop_token_ids, ctx),
        "ignore_eos": bool(req.ignore_eos),
        "min_p": req.min_p or 0.0,
        "presence_penalty": req.presence_penalty or 0.0,
        "frequency_penalty": req.frequency_penalty or 0.0,
        "repetition_penalty": 1.0 if req.repetition_penalty is None else req.repetition_penalty,
        "min_tokens": req.min_tokens or 0,
    }


def processor_fields(req: Body, ctx: ParseContext) -> dict[str, Any]:
    """logit_bias, allowed_token_ids and bad_words as the workers take them (token ids)."""
    out: dict[str, Any] = {}
    if req.logit_bias is not None:
        out["logit_bias"] = _logit_bias(req.logit_bias, ctx)
    if req.allowed_token_ids is not None:
        out["allowed_token_ids"] = tuple(token_ids(req.allowed_token_ids, "allowed_token_ids", ctx))
    if req.bad_words is not None:
        out["bad_words_token_ids"] = _bad_words(req.bad_words, ctx)
    return out


def _logit_bias(value: dict[str, float], ctx: ParseContext) -> tuple[tuple[int, float], ...]:
    """OpenAI's map of token id (a JSON string key) to a bias in [-100, 100]."""
    if len(value) > ctx.max_logit_bias:
        raise value_error("logit_bias", f"at most {ctx.max_logit_bias} entries", len(value))
    out = []
    for key, bias in value.items():
        if not key.lstrip("-").isdigit():
            raise value_error("logit_bias", "token ids as keys", repr(key))
        token = int(key)
        token_ids([token], "logit_bias", ctx)
        out.append((token, bias))
    return tuple(out)


def _bad_words(words: list[str], ctx: ParseContext) -> tuple[tuple[int, ...], ...]:
    """Each word's token ids, stripped and after one space (as vLLM: either form is banned)."""
    if len(words) > ctx.max_bad_words:
        raise value_error("bad_words", f"at most {ctx.max_bad_words} words", len(words))
    forms = {
        tuple(ctx.tokenizer.encode(text, add_special_tokens=False))
        for word in words
        for text in (word.lstrip(), " " + word.lstrip())
    }
    return tuple(sorted(f for f in forms if f))


def _stop_token_ids(value: list[int] | None, ctx: ParseContext) -> tuple[int, ...]:
    if value is None:
        return ()
    if len(value) > ctx.max_stop_token_ids:
        expected = f"at most {ctx.max_stop_token_ids} token ids"
        raise value_error("stop_token_ids", expected, f"{len(value)} ids")
    return tuple(token_ids(value, "stop_token_ids", ctx))


def token_ids(values: list[int], param: str, ctx: ParseContext) -> list[int]:
    """``values`` (validated integers), each inside the vocabulary."""
    limit = ctx.token_limit
    for value in values:
        if not 0 <= value < limit:
            raise invalid_request(
                f"Token id {value} is out of vocabulary (ids are 0 to {limit - 1}).",
                param,
                "invalid_value",
            )
    return list(values)
